"""kernels/triton_moe.py against the torch experts of kernels/moe.py, on random weights of awkward sizes (H, I not
multiples of a block) with routing forced onto a subset of the experts, so that some receive no token. On CPU this
runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest); on a GPU, natively."""
import pytest
import torch

from kernels import moe

pytest.importorskip("triton")
from kernels import triton_moe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
E, H, I = 8, 48, 40
USED = [1, 3, 4, 6, 7]  # experts 0, 2 and 5 get nothing: a leading gap and gaps in the middle


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any(), "some elements were never written"
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def _case(tokens: int, top_k: int, dtype: torch.dtype, seed: int = 0, used: list[int] = USED):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(tokens, H, generator=g, device=DEVICE).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=DEVICE) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=DEVICE) * I ** -0.5).to(dtype)
    logits = torch.full((tokens, E), float("-inf"), device=DEVICE)
    logits[:, used] = torch.randn(tokens, len(used), generator=g, device=DEVICE)
    weights, ids = moe.route(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 3, 7, 33])
def test_fused_moe_matches_reference(tokens, top_k, dtype):
    x, w13, w2, weights, ids = _case(tokens, top_k, dtype, seed=tokens * 10 + top_k)
    got = triton_moe.fused_moe(x, w13, w2, weights, ids)
    assert got.shape == x.shape and got.dtype == dtype
    # the reference in float32 on the same inputs: the kernels round only the intermediate and the pair outputs
    want = moe.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    assert rel_error(got, want) <= TOLERANCE[dtype]
    # the reference in the same dtype rounds after every op and is itself up to ~1e-2 off float32 math in bf16,
    # so two such results may differ by twice that
    assert rel_error(got, moe.fused_moe(x, w13, w2, weights, ids)) <= (1 if dtype == torch.float32 else 2) * \
        TOLERANCE[dtype]


@pytest.mark.parametrize("tokens,top_k,used", [(1, 1, [5]), (7, 2, USED), (33, 4, USED), (40, 2, list(range(E)))])
def test_align_block_size_groups_every_pair_once(tokens, top_k, used):
    _, _, _, _, ids = _case(tokens, top_k, torch.float32, used=used)
    block_m = 16
    sorted_ids, block_expert, num_padded = triton_moe.align_block_size(ids, E, block_m)
    pairs = tokens * top_k
    assert block_expert.shape[0] == triton_moe.triton.cdiv(pairs + min(E, pairs) * (block_m - 1), block_m)
    n = int(num_padded)
    assert n % block_m == 0 and (sorted_ids[n:] == pairs).all()
    real = sorted_ids[:n][sorted_ids[:n] < pairs].long()
    assert torch.equal(real.sort().values, torch.arange(pairs, device=DEVICE))  # each pair exactly once
    flat = ids.reshape(-1)
    for b in range(n // block_m):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < pairs].long()
        assert len(rows) and (flat[rows] == block_expert[b]).all()  # no block is all padding
        assert torch.equal(rows, rows.sort().values)  # by token within an expert, as sort_by_expert


def test_padding_rows_write_nothing_and_every_pair_row_is_written():
    """Buffers poisoned with NaN, with guard rows after the last pair: a padding row's sentinel id is the first
    guard row, so a store it did not mask would show there."""
    tokens, top_k = 7, 2
    x, w13, w2, weights, ids = _case(tokens, top_k, torch.float32, seed=3)
    pairs = tokens * top_k
    inter = torch.full((pairs + 16, I), float("nan"), device=DEVICE)
    out = torch.full((pairs + 16, H), float("nan"), device=DEVICE)
    got = triton_moe.moe_pair_outputs(x, w13, w2, weights, ids, intermediate=inter[:pairs], pair_out=out[:pairs])
    assert got.data_ptr() == out.data_ptr()
    assert not inter[:pairs].isnan().any() and not out[:pairs].isnan().any()
    assert inter[pairs:].isnan().all() and out[pairs:].isnan().all()
    want = moe.combine(got, torch.ones_like(weights), ids)  # weights already applied: sum in expert order
    assert rel_error(want, moe.fused_moe(x, w13, w2, weights, ids)) <= 1e-5


def test_a_token_gets_the_same_row_alone_as_in_a_batch():
    x, w13, w2, weights, ids = _case(33, 2, torch.float32, seed=4)
    batch = triton_moe.fused_moe(x, w13, w2, weights, ids)
    for i in [0, 5, 16, 32]:
        alone = triton_moe.fused_moe(x[i:i + 1], w13, w2, weights[i:i + 1], ids[i:i + 1])
        assert rel_error(alone, batch[i:i + 1]) <= 1e-6


def test_no_tokens_returns_empty_without_launching(monkeypatch):
    x, w13, w2, weights, ids = _case(0, 2, torch.bfloat16)
    monkeypatch.setattr(triton_moe, "_gate_up_kernel", None)  # launching would fail
    monkeypatch.setattr(triton_moe, "_down_kernel", None)
    got = triton_moe.fused_moe(x, w13, w2, weights, ids)
    assert got.shape == (0, H) and got.dtype == torch.bfloat16 and got.device == x.device


def _refuse(*args, **kwargs):
    raise AssertionError("host synchronisation")


def test_fused_moe_never_waits_for_the_device(monkeypatch):
    x, w13, w2, weights, ids = _case(7, 2, torch.float32, seed=5)
    want = moe.fused_moe(x, w13, w2, weights, ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = triton_moe.fused_moe(x, w13, w2, weights, ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:  # no syncs to see on CPU: refuse every way a tensor's value reaches Python instead
        with monkeypatch.context() as patch:
            for name in ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique"]:
                patch.setattr(torch.Tensor, name, _refuse)
            for name in ["nonzero", "unique", "bincount", "masked_select"]:
                patch.setattr(torch, name, _refuse)
            with pytest.raises(AssertionError, match="host synchronisation"):  # the patch bites: the eager path
                moe.fused_moe(x, w13, w2, weights, ids)  # reads its counts with .tolist()
            got = triton_moe.fused_moe(x, w13, w2, weights, ids)
    assert rel_error(got, want) <= 1e-5
