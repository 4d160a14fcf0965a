"""The AVX2 CPU kernels (kernels/cpu/, torch.ops.tokenmill) against their plain-torch references
(kernels/cpu_ops.py), and the invariances they promise: a row's output does not depend on the other rows of the
call, its place among them or the thread count; a sequence's attention does not depend on the batch or the table
width. The extension is built once (about a minute the first time, then cached under .build/torch_ext/)."""
import hashlib

import numpy as np
import pytest
import torch

from kernels import cpu_ops, cpu_quant

PAGE = 16


@pytest.fixture(scope="module")
def ops():
    reason = cpu_ops.missing()
    if reason:
        pytest.skip(f"tokenmill's CPU kernels cannot be built here: {reason}")
    return cpu_ops.load()


@pytest.fixture
def threads():
    """Set torch's thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _q4_1(n: int, k: int, seed: int = 0) -> cpu_quant.PackedQ4_1:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.02).half().float()
    m = (-torch.rand(n, k // 32, generator=g) * 0.15).half().float()
    return cpu_quant.pack_q4_1(q, d, m)


def _q8_0(n: int, k: int, seed: int = 0) -> cpu_quant.PackedQ8_0:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g)
    return cpu_quant.pack_q8_0(q, (torch.rand(n, k // 32, generator=g) * 0.002).half().float())


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 20  # an outlier channel, as real activations have
    return x


LINEARS = {"q4_1": (_q4_1, cpu_quant.q4_1_linear_reference), "q8_0": (_q8_0, cpu_quant.q8_0_linear_reference)}


def _run(ops, kind: str, x, packed, bias=None):
    return getattr(ops, f"{kind}_linear")(x, *packed, bias)


# ---- activation quantization ----------------------------------------------------------------------------------------

def test_activation_quantization_is_bit_identical_to_the_reference(ops):
    x = _x(9, 1536)
    x[2, 64:96] = 0          # an all-zero block: dx = 0, q = 0
    x[3, :32] = 1e-30        # tiny values
    x[4, 32:64] *= 1e6       # huge ones
    x[5, 96:128] = torch.arange(32) - 15.5  # halves: rounding ties go to even
    got, want = ops.quantize_q8_1(x.view(3, 3, 1536)), cpu_quant.quantize_q8_1_reference(x.view(3, 3, 1536))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)
    assert int(got[0].abs().max()) == 127


# ---- quantized linears ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("k, n", [(576, 960), (1536, 13), (576, 100)])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 33, 70])
def test_linear_matches_its_reference(ops, kind, k, n, rows):
    make, reference = LINEARS[kind]
    packed, x = make(n, k), _x(rows, k)
    bias = torch.randn(n) if rows % 2 else None
    want = reference(x, *packed, bias)
    torch.testing.assert_close(_run(ops, kind, x, packed, bias), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_linear_takes_leading_dims_and_no_rows(ops):
    packed, x = _q4_1(24, 64), _x(6, 64)
    assert torch.equal(ops.q4_1_linear(x.view(2, 3, 64), *packed).view(6, 24), ops.q4_1_linear(x, *packed))
    assert ops.q4_1_linear(x[:0], *packed).shape == (0, 24)


@pytest.mark.parametrize("k", [576, 1536])
def test_integer_dot_products_are_exact(ops, k):
    """With every float step exact (block maxima of 127 so dx = 1, power-of-two scales, small sums), the kernels'
    results must equal the exact sums bit for bit: any wrong nibble, lane or sign in the integer path shows."""
    g = torch.Generator().manual_seed(3)
    rows, n = 11, 40
    x = torch.randint(-127, 128, (rows, k), generator=g).float()
    x[:, ::32] = 127.0
    q4 = torch.randint(0, 16, (n, k), generator=g)
    d4 = 2.0 ** -torch.randint(1, 4, (n, k // 32), generator=g).float()
    m4 = torch.randint(-2, 3, (n, k // 32), generator=g).float() / 8
    packed = cpu_quant.pack_q4_1(q4, d4, m4)
    assert torch.equal(ops.q4_1_linear(x, *packed), cpu_quant.q4_1_linear_reference(x, *packed))
    want = (x.double() @ cpu_quant.dequantize_q4_1(*packed).double().t()).float()  # exact here as well
    assert torch.equal(ops.q4_1_linear(x, *packed), want)
    q8 = torch.randint(-31, 32, (n, k), generator=g)
    d8 = 2.0 ** -torch.randint(0, 2, (n, k // 32), generator=g).float()
    packed = cpu_quant.pack_q8_0(q8, d8)
    assert torch.equal(ops.q8_0_linear(x, *packed), cpu_quant.q8_0_linear_reference(x, *packed))


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_a_row_is_bit_identical_whatever_the_other_rows_and_its_place(ops, kind):
    packed, x = LINEARS[kind][0](100, 1536), _x(70, 1536)
    full = _run(ops, kind, x, packed)
    for rows in (1, 2, 3, 5, 8, 9, 16, 17, 33, 64):
        assert torch.equal(_run(ops, kind, x[:rows], packed), full[:rows]), rows
    for i in (0, 7, 8, 31, 69):
        assert torch.equal(_run(ops, kind, x[i:i + 1], packed), full[i:i + 1]), i
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_run(ops, kind, x[perm], packed), full[perm])


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_results_do_not_depend_on_the_thread_count(ops, kind, threads):
    packed, x = LINEARS[kind][0](960, 576), _x(37, 576)
    threads(1)
    one = _run(ops, kind, x, packed)
    threads(2)
    assert torch.equal(_run(ops, kind, x, packed), one)


def test_linear_rejects_mismatched_shapes(ops):
    packed, x = _q4_1(16, 64), _x(2, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.q4_1_linear(x[:, :40], *packed)
    with pytest.raises(RuntimeError, match="qs must be"):
        ops.q4_1_linear(_x(2, 96), *packed)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.q4_1_linear(x, packed.qs, packed.scales, 17)
    with pytest.raises(RuntimeError, match="qs must be"):  # Q8_0 weights given to the Q4_1 op
        ops.q4_1_linear(x, *_q8_0(16, 64))


# ---- packing --------------------------------------------------------------------------------------------------------

def test_packing_round_trips_for_row_counts_off_the_tile():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randint(0, 16, (13, 96), generator=g), (torch.rand(13, 3, generator=g)).half().float()
    m = -d
    back = cpu_quant.unpack_q4_1(*cpu_quant.pack_q4_1(q, d, m))
    assert torch.equal(back[0].long(), q) and torch.equal(back[1], d) and torch.equal(back[2], m)
    q8 = torch.randint(-127, 128, (13, 96), generator=g)
    back = cpu_quant.unpack_q8_0(*cpu_quant.pack_q8_0(q8, d))
    assert torch.equal(back[0].long(), q8) and torch.equal(back[1], d)


def _gguf_round_trip(name: str, w: np.ndarray) -> torch.Tensor:
    from gguf.quants import GGMLQuantizationType, dequantize, quantize
    kind = GGMLQuantizationType[name]
    return torch.from_numpy(dequantize(quantize(w, kind), kind))


def test_weights_quantized_by_gguf_repack_losslessly():
    w = np.random.default_rng(0).standard_normal((40, 576), dtype=np.float32) * 0.05
    w4 = _gguf_round_trip("Q4_1", w)
    assert torch.equal(cpu_quant.dequantize_q4_1(*cpu_quant.pack_q4_1(*cpu_quant.q4_1_from_float(w4))), w4)
    w8 = _gguf_round_trip("Q8_0", w)
    assert torch.equal(cpu_quant.dequantize_q8_0(*cpu_quant.pack_q8_0(*cpu_quant.q8_0_from_float(w8))), w8)


def test_exact_conversion_refuses_weights_it_cannot_hold():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="not exactly"):
        cpu_quant.q4_1_from_float(w)
    with pytest.raises(ValueError, match="not exactly"):
        cpu_quant.q8_0_from_float(w)
    q, d, m = cpu_quant.q4_1_from_float(w, exact=False)  # lossy: the GGUF rule
    assert (cpu_quant.dequantize_q4_1(*cpu_quant.pack_q4_1(q, d, m)) - w).abs().max() <= 0.6 * d.max()


@pytest.mark.slow
def test_the_default_models_weights_repack_losslessly(smollm_gguf):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    tensors = [t for t in GGUFReader(smollm_gguf).tensors
               if t.name.startswith("blk.0.") or t.name == "token_embd.weight"]
    kinds = set()
    for t in tensors:
        if t.tensor_type.name not in ("Q4_1", "Q8_0"):
            continue
        kinds.add(t.tensor_type.name)
        w = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type)))
        if t.tensor_type.name == "Q4_1":
            back = cpu_quant.dequantize_q4_1(*cpu_quant.pack_q4_1(*cpu_quant.q4_1_from_float(w)))
        else:
            back = cpu_quant.dequantize_q8_0(*cpu_quant.pack_q8_0(*cpu_quant.q8_0_from_float(w)))
        assert torch.equal(back, w), t.name
    assert kinds == {"Q4_1", "Q8_0"}


# ---- paged decode attention -----------------------------------------------------------------------------------------

def _paged(lens: list[int], heads: int, kv_heads: int, dim: int, width: int | None = None, seed: int = 0):
    """A shuffled paged cache holding len tokens per sequence; tables padded to `width` with block 0."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-n // PAGE) for n in lens]
    width = width or max(max(blocks), 1)
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, PAGE, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, PAGE, kv_heads, dim, generator=g)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for b, nb in enumerate(blocks):
        tables[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)], dtype=torch.int32)
    q = torch.randn(len(lens), heads, dim, generator=g)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 128), (8, 2, 40)])
def test_attention_matches_the_reference(ops, heads, kv_heads, dim):
    q, k, v, tables, lens = _paged([1, 17, 100, 16, 300], heads, kv_heads, dim)
    want = cpu_ops.paged_decode_attention_reference(q, k, v, tables, lens, dim ** -0.5)
    torch.testing.assert_close(ops.paged_decode_attention(q, k, v, tables, lens, dim ** -0.5), want,
                               rtol=1e-5, atol=1e-5)


def test_attention_with_no_context_is_zero(ops):
    q, k, v, tables, lens = _paged([0, 5], 9, 3, 64)
    out = ops.paged_decode_attention(q, k, v, tables, lens, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 2, 40)])
def test_float16_caches_match_the_reference(ops, heads, kv_heads, dim):
    q, k, v, tables, lens = _paged([1, 17, 100, 16, 300], heads, kv_heads, dim)
    k, v = k.half(), v.half()
    want = cpu_ops.paged_decode_attention_reference(q, k, v, tables, lens, dim ** -0.5)
    assert want.dtype == torch.float32
    torch.testing.assert_close(ops.paged_decode_attention(q, k, v, tables, lens, dim ** -0.5), want,
                               rtol=1e-5, atol=1e-5)


def test_attention_refuses_caches_of_two_dtypes_or_bfloat16(ops):
    q, k, v, tables, lens = _paged([20], 9, 3, 64)
    with pytest.raises(RuntimeError, match="alike"):
        ops.paged_decode_attention(q, k.half(), v, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ops.paged_decode_attention(q, k.bfloat16(), v.bfloat16(), tables, lens, 0.125)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_a_sequences_attention_is_bit_identical_alone_in_any_batch_and_table_width(ops, threads, cache_dtype):
    lens = [37, 1, 250, 64, 0, 129, 16]
    q, k, v, tables, ctx = _paged(lens, 9, 3, 64)
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    full = ops.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    for b in range(len(lens)):
        alone = ops.paged_decode_attention(q[b:b + 1], k, v, tables[b:b + 1], ctx[b:b + 1], 0.125)
        assert torch.equal(alone, full[b:b + 1]), b
    perm = torch.tensor([3, 0, 6, 2, 5, 1, 4])
    assert torch.equal(ops.paged_decode_attention(q[perm], k, v, tables[perm], ctx[perm], 0.125), full[perm])
    wide = torch.cat([tables, torch.full((len(lens), 9), 2, dtype=torch.int32)], 1)  # padded with a valid block
    assert torch.equal(ops.paged_decode_attention(q, k, v, wide, ctx, 0.125), full)
    threads(1)
    assert torch.equal(ops.paged_decode_attention(q, k, v, tables, ctx, 0.125), full)


def test_attention_rejects_a_table_that_does_not_cover_the_context(ops):
    q, k, v, tables, lens = _paged([40], 9, 3, 64)
    with pytest.raises(RuntimeError, match="outside"):
        ops.paged_decode_attention(q, k, v, tables[:, :1], lens, 0.125)
    bad = tables.clone()
    bad[0, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match="not a block"):
        ops.paged_decode_attention(q, k, v, bad, lens, 0.125)


def _hashed(shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """Values k / 128, k in -256..255, from integer arithmetic: the same on every machine and torch version."""
    i = torch.arange(int(np.prod(shape)), dtype=torch.int64)
    h = (i * 2654435761 + salt * 40503) % (1 << 32)
    return (((h >> 13) % 512 - 256).float() / 128).view(shape)


@pytest.mark.parametrize("heads, kv_heads, dim, digest", [
    (9, 3, 64, "38944b6b5b33aa08"), (4, 4, 128, "c9408638d2727d69"), (8, 2, 40, "7917fa6d0c669397"),
    (5, 1, 64, "a54739d63fb82a38")])
def test_decode_attention_results_have_not_moved(ops, heads, kv_heads, dim, digest):
    """The digests were taken from the op before its routine was shared with paged_prefill_attention: greedy tokens
    decoded before then must come out the same."""
    lens = [1, 17, 100, 300, 0, 33, 64]
    num_blocks, width = 47, 20
    tables = ((torch.arange(len(lens) * width) * 7 + 3) % num_blocks).to(torch.int32).view(len(lens), width)
    k, v = _hashed((num_blocks, PAGE, kv_heads, dim), 1), _hashed((num_blocks, PAGE, kv_heads, dim), 2)
    out = ops.paged_decode_attention(_hashed((len(lens), heads, dim), 3), k, v, tables,
                                     torch.tensor(lens, dtype=torch.int32), dim ** -0.5)
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16] == digest


# ---- torch.compile, availability ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_ops_compile_into_one_inductor_graph(ops):
    torch._dynamo.reset()
    w1, w2 = _q4_1(64, 96), _q8_0(40, 64)
    q, k, v, tables, lens = _paged([5, 40], 9, 3, 64)

    def step(x, q):
        h = torch.ops.tokenmill.q4_1_linear(x, *w1)
        y = torch.ops.tokenmill.q8_0_linear(torch.relu(h), *w2)
        return y, torch.ops.tokenmill.paged_decode_attention(q, k, v, tables, lens, 0.125) * 2

    x = _x(3, 96)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(x, q), step(x, q)):
        assert torch.equal(got, want)


def test_a_cpu_without_avx2_is_named_as_the_cause(monkeypatch):
    monkeypatch.setattr(cpu_ops, "_cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(cpu_ops.platform, "machine", lambda: "x86_64")
    assert cpu_ops.missing() == "the CPU lacks AVX2, FMA, F16C"
    assert not cpu_ops.available()
    monkeypatch.setattr(cpu_ops, "_loaded", False)
    with pytest.raises(RuntimeError, match="unavailable: the CPU lacks AVX2"):
        cpu_ops.load()
