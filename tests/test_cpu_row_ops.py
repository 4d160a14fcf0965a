"""The per-token CPU ops (kernels/cpu/row_ops.cpp: rms_norm, rms_norm_residual, silu_and_mul, rotary) and paged
prefill attention (kernels/cpu/paged_attention.cpp) against their plain-torch references, and what they exist for:
a token's result is bit-identical however it is served. A row's output does not depend on the other rows, its place
among them, the thread count or the input's strides; a prefilled token's attention equals its decode attention bit
for bit, in one chunk or several; and a compiled graph of the ops gives eager's bits."""
import pytest
import torch

from kernels import cpu_ops, reference

PAGE = 16


@pytest.fixture(scope="module")
def ops():
    reason = cpu_ops.missing()
    if reason:
        pytest.skip(f"tokenmill's CPU kernels cannot be built here: {reason}")
    return cpu_ops.load()


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- references -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [64, 128, 576, 896, 2048, 20, 13])
def test_rms_norm_matches_the_reference(ops, dim):
    g = _gen(dim)
    x, residual = torch.randn(9, dim, generator=g) * 3, torch.randn(9, dim, generator=g)
    w = torch.randn(dim, generator=g)
    _close(ops.rms_norm(x, w, 1e-6), cpu_ops.rms_norm_reference(x, w, 1e-6))
    out, new_residual = ops.rms_norm_residual(x, residual, w, 1e-5)
    want_out, want_residual = cpu_ops.rms_norm_residual_reference(x, residual, w, 1e-5)
    assert torch.equal(new_residual, want_residual)  # one rounded sum, as the reference's
    _close(out, want_out)


def test_rms_norm_of_per_head_views_matches_the_reference(ops):
    """Qwen3 normalises each head of q and k: x is a [n, heads, 64] view of the fused projection's output."""
    qkv, w = torch.randn(7, 960, generator=_gen()), torch.randn(64, generator=_gen(1))
    q, k = qkv[:, :576].view(7, 9, 64), qkv[:, 576:768].view(7, 3, 64)
    for x in (q, k):
        got = ops.rms_norm(x, w, 1e-6)
        assert got.is_contiguous() and got.shape == x.shape
        _close(got, cpu_ops.rms_norm_reference(x, w, 1e-6))


def test_silu_and_mul_matches_the_reference(ops):
    g = _gen()
    x = torch.randn(11, 2 * 1536, generator=g) * 4
    x[0, :12] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.5, -87.5, 88.5, -88.5, 100.0, -100.0, 1e-3, -1e-3])
    got, want = ops.silu_and_mul(x), cpu_ops.silu_and_mul_reference(x)
    assert got.shape == (11, 1536)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    for dim in (20, 13, 64):  # rows whose halves end in a partial vector
        x = torch.randn(5, 2 * dim, generator=g) * 4
        torch.testing.assert_close(ops.silu_and_mul(x), cpu_ops.silu_and_mul_reference(x), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 128), (8, 2, 40)])
def test_rotary_is_bit_identical_to_the_reference(ops, heads, kv_heads, dim):
    g = _gen(dim)
    n = 13
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g)
    q, k = qkv[:, :heads * dim].view(n, heads, dim), qkv[:, heads * dim:(heads + kv_heads) * dim].view(n, kv_heads, dim)
    angles = torch.arange(n).float()[:, None] * 0.37 ** torch.arange(dim // 2).float()
    cos, sin = angles.cos(), angles.sin()
    got, want = ops.rotary(q, k, cos, sin), cpu_ops.rotary_reference(q, k, cos, sin)
    for a, b in zip(got, want):
        assert a.is_contiguous() and torch.equal(a, b)


# ---- row invariance -------------------------------------------------------------------------------------------------

def _row_ops(ops, dim: int = 576):
    """Each op as f(rows) on [M, ...] inputs, with the full inputs for 100 rows."""
    g = _gen(7)
    w = torch.randn(dim, generator=g)
    qkv = torch.randn(100, 960, generator=g)
    angles = torch.randn(100, 32, generator=g) * 10
    cos, sin = angles.cos(), angles.sin()
    x, res, gate_up = torch.randn(100, dim, generator=g), torch.randn(100, dim, generator=g), torch.randn(100, 3072)
    return {
        "rms_norm": lambda i: ops.rms_norm(x[i], w, 1e-6),
        "rms_norm_residual": lambda i: torch.cat(ops.rms_norm_residual(x[i], res[i], w, 1e-6), -1),
        "rms_norm per head": lambda i: ops.rms_norm(qkv[i, :576].view(-1, 9, 64), w[:64], 1e-6),
        "silu_and_mul": lambda i: ops.silu_and_mul(gate_up[i]),
        "rotary": lambda i: torch.cat([t.flatten(1) for t in ops.rotary(
            qkv[i, :576].view(-1, 9, 64), qkv[i, 576:768].view(-1, 3, 64), cos[i], sin[i])], -1),
    }


@pytest.mark.parametrize("name", ["rms_norm", "rms_norm_residual", "rms_norm per head", "silu_and_mul", "rotary"])
def test_a_row_is_bit_identical_alone_in_any_batch_and_thread_count(ops, threads, name):
    f = _row_ops(ops)[name]
    threads(2)
    full = f(torch.arange(100))
    for m in (1, 2, 3, 7, 8, 9, 33, 64):
        assert torch.equal(f(torch.arange(m)), full[:m]), m
    for i in (0, 5, 31, 99):
        assert torch.equal(f(torch.tensor([i])), full[i:i + 1]), i
    perm = torch.randperm(100, generator=_gen())
    assert torch.equal(f(perm), full[perm])
    threads(1)
    assert torch.equal(f(torch.arange(100)), full)


def test_strided_inputs_give_the_bits_of_contiguous_copies(ops):
    g = _gen(3)
    qkv, w64, w = torch.randn(21, 960, generator=g), torch.randn(64, generator=g), torch.randn(576, generator=g)
    q, k = qkv[:, :576].view(21, 9, 64), qkv[:, 576:768].view(21, 3, 64)
    assert torch.equal(ops.rms_norm(q, w64, 1e-6), ops.rms_norm(q.contiguous(), w64, 1e-6))
    angles = torch.randn(21, 64, generator=g)
    cos, sin = angles.cos()[:, ::2], angles.sin()[:, ::2]  # strided cos, sin: not even their last dim contiguous
    for a, b in zip(ops.rotary(q, k, cos, sin), ops.rotary(q.contiguous(), k.contiguous(), cos.contiguous(),
                                                            sin.contiguous())):
        assert torch.equal(a, b)
    # a transposed projection output (models/cpu_linear.py), and one sliced from a wider one
    xt, rt = torch.randn(576, 21, generator=g).t(), torch.randn(21, 600, generator=g)[:, :576]
    assert torch.equal(ops.rms_norm(xt, w, 1e-6), ops.rms_norm(xt.contiguous(), w, 1e-6))
    for a, b in zip(ops.rms_norm_residual(xt, rt, w, 1e-6), ops.rms_norm_residual(xt.contiguous(), rt.contiguous(),
                                                                                   w, 1e-6)):
        assert torch.equal(a, b)
    gate_up = torch.randn(1200, 21, generator=g).t()[:, 8:1208]
    assert torch.equal(ops.silu_and_mul(gate_up), ops.silu_and_mul(gate_up.contiguous()))


def test_row_ops_take_no_rows_and_refuse_what_they_cannot_compute(ops):
    w = torch.ones(64)
    assert ops.rms_norm(torch.empty(0, 64), w, 1e-6).shape == (0, 64)
    assert ops.silu_and_mul(torch.empty(0, 128)).shape == (0, 64)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 32), w, 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(torch.randn(2, 64).double(), w, 1e-6)
    with pytest.raises(RuntimeError, match="one shape"):
        ops.rms_norm_residual(torch.randn(2, 64), torch.randn(3, 64), w, 1e-6)
    with pytest.raises(RuntimeError, match="must be even"):
        ops.silu_and_mul(torch.randn(2, 63))
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rotary(torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.randn(2, 64), torch.randn(2, 64))


# ---- paged prefill attention ----------------------------------------------------------------------------------------

def _prefill_batch(chunks: list[int], contexts: list[int], heads: int, kv_heads: int, dim: int, seed: int = 0):
    """A shuffled paged cache holding contexts[b] tokens of sequence b, whose last chunks[b] are this step's queries."""
    g = _gen(seed)
    blocks = [-(-n // PAGE) for n in contexts]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, PAGE, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, PAGE, kv_heads, dim, generator=g)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(contexts), max(max(blocks), 1) + 1, dtype=torch.int32)
    for b, nb in enumerate(blocks):
        tables[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)], dtype=torch.int32)
    q = torch.randn(sum(chunks), heads, dim, generator=g)
    cu = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, cu, torch.tensor(contexts, dtype=torch.int32), tables


CASES = {  # chunks, contexts
    "one prompt": ([37], [37]),
    "cached prefixes": ([5, 16, 40], [21, 16, 100]),
    "chunks crossing pages": ([20, 1, 33], [29, 17, 64]),
    "a long chunk after a prefix": ([130], [200]),
}


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 128)])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_attention_matches_the_reference(ops, case, heads, kv_heads, dim):
    args = _prefill_batch(*CASES[case], heads, kv_heads, dim)
    got = ops.paged_prefill_attention(*args, dim ** -0.5)
    torch.testing.assert_close(got, cpu_ops.paged_prefill_attention_reference(*args, dim ** -0.5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_attention_over_float16_caches_matches_the_reference(ops, case):
    q, k, v, *rest = _prefill_batch(*CASES[case], 9, 3, 64)
    args = (q, k.half(), v.half(), *rest)
    got = ops.paged_prefill_attention(*args, 0.125)
    torch.testing.assert_close(got, cpu_ops.paged_prefill_attention_reference(*args, 0.125), rtol=1e-5, atol=1e-5)


def test_store_kv_rounds_into_float16_caches_as_torch_does(ops):
    g = _gen(4)
    k, v = torch.randn(40, 3, 64, generator=g) * 30, torch.randn(40, 3, 64, generator=g)
    slots = torch.randperm(10 * PAGE, generator=g)[:40]
    slots[[3, 17]] = -1  # padding rows write nothing
    for rows in ((k, v), (k.transpose(1, 2).contiguous().transpose(1, 2), v[:, :, :]), (k[:, :, ::2], v[:, :, ::2])):
        dim = rows[0].shape[-1]
        got = [torch.zeros(10, PAGE, 3, dim, dtype=torch.float16) for _ in range(2)]
        want = [torch.zeros(10, PAGE, 3, dim, dtype=torch.float16) for _ in range(2)]
        ops.store_kv(*rows, *got, slots)
        reference.store_kv(*rows, *want, slots)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="dtype"):
        ops.store_kv(k.half(), v.half(), torch.zeros(10, PAGE, 3, 64), torch.zeros(10, PAGE, 3, 64), slots)


def _decode_each_token(ops, q, k_cache, v_cache, cu, contexts, tables, scale):
    """Every query row as a decode step: one sequence per row, context = its position + 1."""
    seq = torch.repeat_interleave(torch.arange(len(contexts)), cu.diff())
    row_in_seq = torch.arange(q.shape[0]) - cu[:-1].long()[seq]
    lens = (contexts[seq] - cu.diff()[seq] + row_in_seq + 1).to(torch.int32)
    return ops.paged_decode_attention(q, k_cache, v_cache, tables[seq], lens, scale)


@pytest.mark.parametrize("heads, kv_heads, dim, cache_dtype", [(9, 3, 64, torch.float32), (4, 4, 128, torch.float32),
                                                              (8, 2, 40, torch.float32), (5, 1, 32, torch.float32),
                                                              (9, 3, 64, torch.float16)])
def test_a_prefilled_token_attends_bit_for_bit_as_its_decode_step(ops, threads, heads, kv_heads, dim, cache_dtype):
    q, k, v, cu, contexts, tables = _prefill_batch([5, 16, 40, 1, 0, 9], [21, 16, 100, 1, 7, 130], heads, kv_heads,
                                                   dim, seed=dim)
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    want = _decode_each_token(ops, q, k, v, cu, contexts, tables, 0.1)
    for n in (2, 1):
        threads(n)
        assert torch.equal(ops.paged_prefill_attention(q, k, v, cu, contexts, tables, 0.1), want), n


def test_a_prompt_prefilled_in_chunks_attends_as_in_one(ops):
    """K/V stored chunk by chunk, each chunk attending to the ones before through the cache: the same bits as one
    prefill of the whole prompt, with another sequence sharing each step."""
    g = _gen(5)
    length, heads, kv_heads, dim = 90, 9, 3, 64
    q, k, v = (torch.randn(length, n, dim, generator=g) for n in (heads, kv_heads, kv_heads))
    other_q, other_k, other_v = (torch.randn(4, n, dim, generator=g) for n in (heads, kv_heads, kv_heads))
    table = torch.tensor([[3, 7, 1, 9, 4, 0]], dtype=torch.int32)
    other_table = torch.tensor([[2, 2, 2, 2, 2, 2]], dtype=torch.int32)
    slots = (table[0].long()[torch.arange(length) // PAGE] * PAGE + torch.arange(length) % PAGE)

    def empty():
        return torch.zeros(10, PAGE, kv_heads, dim), torch.zeros(10, PAGE, kv_heads, dim)

    k_cache, v_cache = empty()
    ops.store_kv(k, v, k_cache, v_cache, slots)
    whole = ops.paged_prefill_attention(q, k_cache, v_cache, torch.tensor([0, length], dtype=torch.int32),
                                        torch.tensor([length], dtype=torch.int32), table, dim ** -0.5)
    k_cache, v_cache = empty()
    rows, start = [], 0
    for size in (7, 16, 1, 30, 36):
        end = start + size
        ops.store_kv(torch.cat([k[start:end], other_k]), torch.cat([v[start:end], other_v]), k_cache, v_cache,
                     torch.cat([slots[start:end], torch.arange(32, 36)]))
        out = ops.paged_prefill_attention(torch.cat([q[start:end], other_q]), k_cache, v_cache,
                                          torch.tensor([0, size, size + 4], dtype=torch.int32),
                                          torch.tensor([end, 4], dtype=torch.int32), torch.cat([table, other_table]),
                                          dim ** -0.5)
        rows.append(out[:size])
        start = end
    assert torch.equal(torch.cat(rows), whole)


def test_prefill_attention_rejects_inconsistent_batches(ops):
    q, k, v, cu, contexts, tables = _prefill_batch([5, 16], [21, 16], 9, 3, 64)

    def run(cu=cu, contexts=contexts, tables=tables):
        return ops.paged_prefill_attention(q, k, v, cu, contexts, tables, 0.125)

    with pytest.raises(RuntimeError, match="run from 0"):
        run(cu=torch.tensor([0, 5, 20], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="query rows"):
        run(cu=torch.tensor([0, 22, 21], dtype=torch.int32), contexts=torch.tensor([30, 16], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="query rows"):
        run(contexts=torch.tensor([21, 15], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="outside"):
        run(contexts=torch.tensor([21, 16 * tables.shape[1] + 1], dtype=torch.int32))
    bad = tables.clone()
    bad[0, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match="not a block"):
        run(tables=bad)
    with pytest.raises(RuntimeError, match=r"batch \+ 1"):
        run(cu=cu[:2])


# ---- torch.compile --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_compiled_layer_of_the_ops_gives_eager_bits(ops):
    torch._dynamo.reset()
    g = _gen(11)
    q, k_cache, v_cache, cu, contexts, tables = _prefill_batch([6, 3], [22, 3], 9, 3, 64)
    n = q.shape[0]
    hidden, residual = torch.randn(n, 576, generator=g), torch.randn(n, 576, generator=g)
    w, w_head = torch.randn(576, generator=g), torch.randn(64, generator=g)
    qkv_w, up_w = torch.randn(960, 576, generator=g) * 0.05, torch.randn(3072, 576, generator=g) * 0.05
    angles = torch.randn(n, 32, generator=g)
    cos, sin = angles.cos(), angles.sin()

    def layer(hidden, residual):
        h, residual = torch.ops.tokenmill.rms_norm_residual(hidden, residual, w, 1e-6)
        qkv = h @ qkv_w.t()
        q = torch.ops.tokenmill.rms_norm(qkv[:, :576].view(n, 9, 64), w_head, 1e-6)
        k = torch.ops.tokenmill.rms_norm(qkv[:, 576:768].view(n, 3, 64), w_head, 1e-6)
        q, k = torch.ops.tokenmill.rotary(q, k, cos, sin)
        o = torch.ops.tokenmill.paged_prefill_attention(q * 2, k_cache, v_cache, cu, contexts, tables, 0.125)
        mlp = torch.ops.tokenmill.silu_and_mul(torch.ops.tokenmill.rms_norm(o.view(n, 576), w, 1e-6) @ up_w.t())
        return mlp, k, residual

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(hidden, residual), layer(hidden, residual)):
        assert torch.equal(got, want)
