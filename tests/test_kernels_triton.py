"""Each Triton kernel against its torch reference, on fresh random inputs of awkward shapes; outputs are poisoned
with NaN first so an element the kernel forgets to write shows up. On CPU this runs in Triton's interpreter
(TRITON_INTERPRET=1, set in conftest); on a GPU, natively."""
import pytest
import torch

from kernels import reference

pytest.importorskip("triton")
from kernels import triton_attention, triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (query heads, KV heads, head dim): GQA ratios 1, 3, 4 and 8, head dims 64 and 128
HEADS = [(4, 4, 64), (6, 2, 64), (8, 2, 128), (8, 1, 64)]
DECODE_HEADS = HEADS + [(9, 3, 64)]  # and SmolLM2's: 9 query heads on 3 KV heads
PAGE = 16


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any(), "some elements were never written"
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(*shape, dtype, g) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)


def _paged_cache(lengths: list[int], kv_heads: int, head_dim: int, dtype, g, spare_blocks: int = 3,
                 page: int = PAGE):
    """A cache filled with random K/V, and block tables that scatter each sequence over shuffled blocks."""
    needed = [-(-n // page) for n in lengths]
    num_blocks = sum(needed) + spare_blocks
    k_cache = _randn(num_blocks, page, kv_heads, head_dim, dtype=dtype, g=g)
    v_cache = _randn(num_blocks, page, kv_heads, head_dim, dtype=dtype, g=g)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(int(g.initial_seed())))
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n].tolist() + [0] * (max(needed) - n))  # padded with a valid id
        used += n
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_its_slots_and_skips_negative_ones(dtype):
    g = _gen(1)
    k_cache = torch.full((6, PAGE, 2, 64), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    qkv = _randn(7, (4 + 2 + 2) * 64, dtype=dtype, g=g)  # k and v as strided views of a fused projection
    k, v = qkv[:, 256:384].view(7, 2, 64), qkv[:, 384:].view(7, 2, 64)
    slots = torch.tensor([3, 17, -1, 40, 95, -1, 0], device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, want_k, want_v, slots)
    triton_attention.store_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, want_k, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, want_v, equal_nan=True, rtol=0, atol=0)
    assert k_cache.isnan().sum() == k_cache.numel() - 5 * 2 * 64  # nothing else was touched


def _decode_lengths(page: int = PAGE) -> list[int]:
    """One token, off the page size, three split-KV partitions ending mid-page, exactly one partition (whole
    pages). The split size is the kernel's: smaller in the interpreter."""
    split = triton_attention._decode_plan(page)[0]
    return [1, 17, 2 * split + 37, split]


def _decode_case(lengths: list[int], heads, dtype, seed: int, page: int = PAGE):
    num_heads, kv_heads, head_dim = heads
    g = _gen(seed)
    k_cache, v_cache, tables = _paged_cache(lengths, kv_heads, head_dim, dtype, g, page=page)
    q = _randn(len(lengths), num_heads, head_dim, dtype=dtype, g=g)
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def _check_decode(q, k_cache, v_cache, tables, lens) -> None:
    scale = q.shape[2] ** -0.5
    want = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, scale, out=out)
    assert rel_error(out, want) < TOLERANCE[q.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", DECODE_HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_decode_attention_matches_reference(heads, dtype):
    _check_decode(*_decode_case(_decode_lengths(), heads, dtype, seed=2))


# not a power of two (a block-table load per token); wider than the interpreter's tile (which widens to it)
@pytest.mark.parametrize("page", [12, 64])
def test_decode_attention_other_page_sizes(page):
    _check_decode(*_decode_case(_decode_lengths(page), (9, 3, 64), torch.float32, seed=8, page=page))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_result_does_not_depend_on_the_batch(dtype):
    """Bit for bit the same alone, in a batch, in another order and under a wider (CUDA-graph-sized) table."""
    split = triton_attention._decode_plan(PAGE)[0]
    lengths = [2 * split + 37, 40, 0, 1]
    q, k_cache, v_cache, tables, lens = _decode_case(lengths, (6, 2, 64), dtype, seed=3)
    batch = triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert not batch.isnan().any() and not batch[2].any()  # no context: zeros
    pad = torch.full((len(lengths), 17), k_cache.shape[0] - 1, dtype=tables.dtype, device=DEVICE)
    order = torch.tensor([3, 0, 2, 1], device=DEVICE)
    wide = torch.cat([tables, pad], dim=1)[order]
    reordered = triton_attention.decode_attention(q[order], k_cache, v_cache, wide, lens[order], 0.125)
    torch.testing.assert_close(reordered, batch[order], rtol=0, atol=0)
    for i, n in enumerate(lengths):
        own = tables[i:i + 1, :max(1, -(-n // PAGE))]
        alone = triton_attention.decode_attention(q[i:i + 1], k_cache, v_cache, own, lens[i:i + 1], 0.125)
        torch.testing.assert_close(alone, batch[i:i + 1], rtol=0, atol=0)


def test_decode_workspace_is_read_only_where_written():
    q, k_cache, v_cache, tables, lens = _decode_case([3 * PAGE + 5, 0], (8, 2, 128), torch.float32, seed=9)
    size = triton_attention.decode_workspace_size(4, 8, 128, tables.shape[1] + 10, PAGE)  # room to spare
    workspace = torch.full((size,), float("nan"), device=DEVICE)
    got = triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, 0.1, workspace=workspace)
    want = triton_attention.decode_attention(q, k_cache, v_cache, tables, lens, 0.1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_prefill_attention_matches_reference(heads, dtype):
    num_heads, kv_heads, head_dim = heads
    g = _gen(4)
    # (new tokens, context): plain prefills of odd lengths, a one-token chunk, chunks after a cached prefix
    chunks = [(5, 5), (1, 1), (20, 20), (8, 40), (17, 33)]
    k_cache, v_cache, tables = _paged_cache([c for _, c in chunks], kv_heads, head_dim, dtype, g)
    cu = [0]
    for n, _ in chunks:
        cu.append(cu[-1] + n)
    q = _randn(cu[-1], num_heads, head_dim, dtype=dtype, g=g)
    # the new tokens' K/V as the cache holds them (the reference reads them from k, v for plain prefills)
    k = torch.cat([_gather(k_cache, tables[i], c)[c - n:] for i, (n, c) in enumerate(chunks)])
    v = torch.cat([_gather(v_cache, tables[i], c)[c - n:] for i, (n, c) in enumerate(chunks)])
    scale = head_dim ** -0.5
    lens = torch.tensor([c for _, c in chunks], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    want = reference.prefill_attention(q.float(), k.float(), v.float(), cu, k_cache.float(), v_cache.float(),
                                       tables, lens, scale)
    out = torch.full_like(q, float("nan"))
    triton_attention.prefill_attention(q, k, v, cu, k_cache, v_cache, tables, lens, scale, out=out)
    assert rel_error(out, want) < TOLERANCE[dtype]


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    return cache[table.long()].flatten(0, 1)[:length]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (5, 100), (2, 3, 128)])
def test_rms_norm_with_and_without_residual(shape, dtype):
    g = _gen(5)
    x, residual = _randn(*shape, dtype=dtype, g=g), _randn(*shape, dtype=dtype, g=g)
    weight = _randn(shape[-1], dtype=dtype, g=g)
    out = torch.full_like(x, float("nan"))
    assert rel_error(triton_ops.rms_norm(x, weight, 1e-5, out=out), reference.rms_norm(x, weight, 1e-5)) \
        < TOLERANCE[dtype]
    want, want_residual = reference.rms_norm(x, weight, 1e-5, residual.clone())
    got, got_residual = triton_ops.rms_norm(x, weight, 1e-5, residual)
    assert got_residual is residual  # written in place
    assert rel_error(got, want) < TOLERANCE[dtype]
    assert rel_error(got_residual, want_residual) < TOLERANCE[dtype]
    if dtype != torch.bfloat16:  # the interpreter rounds fp32 -> bf16 by truncation; elsewhere one rounding
        assert torch.equal(got_residual, want_residual)  # of x + residual, exactly as torch does


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2 * 96), (1, 2 * 1500), (3, 2, 2 * 64)])
def test_silu_and_mul(shape, dtype):
    x = _randn(*shape, dtype=dtype, g=_gen(6))
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=DEVICE)
    assert rel_error(triton_ops.silu_and_mul(x, out=out), reference.silu_and_mul(x)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("heads", [(4, 4, 64), (6, 2, 128), (8, 1, 64)], ids=lambda h: f"{h[0]}q{h[1]}kv{h[2]}d")
def test_rotary_in_place_on_views_of_a_fused_qkv(heads, interleaved, dtype):
    num_heads, kv_heads, d = heads
    g = _gen(7)
    n = 5
    qkv = _randn(n, (num_heads + 2 * kv_heads) * d, dtype=dtype, g=g)
    q = qkv[:, :num_heads * d].view(n, num_heads, d)
    k = qkv[:, num_heads * d:(num_heads + kv_heads) * d].view(n, kv_heads, d)
    v_before = qkv[:, (num_heads + kv_heads) * d:].clone()
    angles = torch.rand(n, d // 2, generator=g, device=DEVICE) * 6.28
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want_q, want_k = reference.rotary(q.float(), k.float(), cos.float(), sin.float(), interleaved)
    got_q, got_k = triton_ops.rotary(q, k, cos, sin, interleaved)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert rel_error(q, want_q) < TOLERANCE[dtype] and rel_error(k, want_k) < TOLERANCE[dtype]
    assert torch.equal(qkv[:, (num_heads + kv_heads) * d:], v_before)  # v untouched
