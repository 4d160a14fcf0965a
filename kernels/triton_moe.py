"""Triton kernels for the experts of a Mixture-of-Experts layer, with the signature of kernels/moe.py's fused_moe.

Layout (vLLM's moe_align_block_size, built with device ops of static shapes only): the T * top_k (token, slot)
pairs, numbered token-major (pair = token * top_k + slot), are sorted by expert and each expert's group is padded to
a multiple of BLOCK_M rows with the sentinel T * top_k, so every block of BLOCK_M sorted rows belongs to one expert
(block_expert). The buffer holds the static most any routing can need, T * top_k + min(E, T * top_k) *
(BLOCK_M - 1) rows; the padded total stays on the device and programs past it return at once, so nothing waits on
the host and the whole function can be captured in a CUDA graph.

- _gate_up_kernel: program (block of sorted rows, block of BLOCK_N intermediate columns) gathers its tokens' rows of
  x, accumulates their gate and up projections over H in float32 and writes SiLU(gate) * up to intermediate[pair],
  rounded once to x's dtype.
- _down_kernel: program (block of sorted rows, block of BLOCK_N hidden columns) multiplies intermediate rows by
  w2[e]^T in float32, scales each by its pair's router weight and writes pair_out[pair] in x's dtype.
- fused_moe adds a token's pairs in float32 in ascending expert order (kernels.moe.combine's order) and rounds once.
Block sizes never depend on T, so a token's row is the same alone or in any batch, up to how tl.dot sums a row
at another place in its tile (the interpreter's float32 numpy matmul can differ in the last bit). Sentinel rows
load nothing and store nothing. fp16/bf16 tl.dot operands go in natively on a GPU; float32 ones use
input_precision="ieee".
Under TRITON_INTERPRET=1 the operands are cast to float32 (the interpreter multiplies bf16 wrongly,
triton-lang/triton#11584) and bfloat16 results are rounded to nearest even by hand (it truncates them). Forward
only: unlike the torch version, this is not differentiable.
"""
import os

import torch
import triton
import triton.language as tl

from kernels.moe import sort_by_expert


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small in the interpreter so that tests cover several blocks cheaply."""
    return (16, 32, 32) if _interpreting() else (64, 64, 32)


def align_block_size(topk_ids: torch.Tensor, num_experts: int,
                     block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids int32 [num_blocks * block_m]: pair ids grouped by expert, each group padded to
    a multiple of block_m with the sentinel T * k; block_expert int32 [num_blocks]: each block's expert;
    num_padded int32 [1]: the rows in use). num_blocks is the static bound; blocks past num_padded are sentinels."""
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    order, counts = sort_by_expert(topk_ids, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    # the r-th pair of expert e sits at sorted position start[e] + r and goes to padded_start[e] + r
    shift = (ends - padded) - (torch.cumsum(counts, 0) - counts)
    dest = torch.arange(pairs, device=flat.device) + shift[flat[order]]
    num_blocks = triton.cdiv(pairs + min(num_experts, pairs) * (block_m - 1), block_m)
    sorted_ids = torch.full((num_blocks * block_m,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(num_blocks, device=flat.device) * block_m
    # right=True skips the empty experts whose end equals a block's start; blocks past the end get a valid id
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_max_(num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


@triton.jit
def _round(x, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """float32 x to dtype, to nearest even. The interpreter truncates float32 -> bfloat16 (a GPU rounds), which
    biases every pair the same way; there it is rounded on the bits instead (x finite)."""
    if BF16_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, inter_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_pairs,
                    top_k, hidden, inter_size, stride_xt, stride_we, stride_wn, stride_it,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                    BF16_BY_HAND: tl.constexpr):
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    p_mask = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < inter_size
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + k[None, :]
    # [BLOCK_K, BLOCK_N] tiles of the gate rows and of the up rows (inter_size rows further on)
    gate_ptrs = w13_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]
    up_ptrs = gate_ptrs + inter_size * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = k < hidden - k0
        a = tl.load(x_ptrs + k0, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(gate_ptrs + k0, mask=w_mask, other=0.0)
        wu = tl.load(up_ptrs + k0, mask=w_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            gate = tl.dot(a, wg.to(tl.float32), gate, input_precision="ieee")
            up = tl.dot(a, wu.to(tl.float32), up, input_precision="ieee")
        else:
            gate = tl.dot(a, wg, gate)
            up = tl.dot(a, wu, up)
    y = _round(gate * tl.sigmoid(gate) * up, inter_ptr.dtype.element_ty, BF16_BY_HAND)
    rows = pairs.to(tl.int64)
    tl.store(inter_ptr + rows[:, None] * stride_it + n[None, :], y, mask=p_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(inter_ptr, w2_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                 num_pairs, hidden, inter_size, stride_it, stride_we, stride_wn, stride_ot,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                 BF16_BY_HAND: tl.constexpr):
    pid_m = tl.program_id(0)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    p_mask = pairs < num_pairs
    rows = pairs.to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < hidden
    k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows[:, None] * stride_it + k[None, :]
    w_ptrs = w2_ptr + expert * stride_we + n[None, :].to(tl.int64) * stride_wn + k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        k_mask = k < inter_size - k0
        a = tl.load(a_ptrs + k0, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    acc *= tl.load(weights_ptr + rows, mask=p_mask, other=0.0).to(tl.float32)[:, None]
    y = _round(acc, out_ptr.dtype.element_ty, BF16_BY_HAND)
    tl.store(out_ptr + rows[:, None] * stride_ot + n[None, :], y, mask=p_mask[:, None] & n_mask[None, :])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def moe_pair_outputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, intermediate: torch.Tensor | None = None,
                     pair_out: torch.Tensor | None = None) -> torch.Tensor:
    """pair_out [T * k, H] in x's dtype, token-major: each pair's expert output times its router weight.
    intermediate [T * k, I] and pair_out may be given (only rows with stride(-1) == 1); they are allocated
    otherwise. T must be > 0."""
    tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    inter_size = two_i // 2
    num_pairs = tokens * top_k
    x, w13, w2 = _last_dim_contiguous(x), _last_dim_contiguous(w13), _last_dim_contiguous(w2)
    weights = topk_weights.reshape(-1)  # token-major, as the pair ids
    if intermediate is None:
        intermediate = torch.empty(num_pairs, inter_size, dtype=x.dtype, device=x.device)
    if pair_out is None:
        pair_out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    assert intermediate.stride(-1) == 1 and pair_out.stride(-1) == 1
    block_m, block_n, block_k = _blocks()
    sorted_ids, block_expert, num_padded = align_block_size(topk_ids, num_experts, block_m)
    num_blocks = block_expert.shape[0]
    dot_fp32 = _interpreting() or x.dtype == torch.float32
    by_hand = _interpreting() and x.dtype == torch.bfloat16
    _gate_up_kernel[(num_blocks, triton.cdiv(inter_size, block_n))](
        x, w13, intermediate, sorted_ids, block_expert, num_padded, num_pairs, top_k, hidden, inter_size,
        x.stride(0), w13.stride(0), w13.stride(1), intermediate.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_fp32, BF16_BY_HAND=by_hand)
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        intermediate, w2, pair_out, weights, sorted_ids, block_expert, num_padded, num_pairs, hidden, inter_size,
        intermediate.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_fp32, BF16_BY_HAND=by_hand)
    return pair_out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts' output for x [T, H] (kernels.moe.fused_moe's semantics): a token's weighted pair outputs added
    in float32 in ascending expert order, rounded once to x's dtype. No host synchronisation."""
    tokens, top_k = topk_ids.shape
    if tokens == 0:
        return x.new_empty(0, x.shape[-1])
    pair_out = moe_pair_outputs(x, w13, w2, topk_weights, topk_ids).view(tokens, top_k, -1)
    if top_k == 1:
        return pair_out[:, 0]
    slots = topk_ids.argsort(dim=-1)
    ordered = pair_out.gather(1, slots.unsqueeze(-1).expand_as(pair_out))
    out = ordered[:, 0].float()
    for j in range(1, top_k):
        out += ordered[:, j]
    return out.to(x.dtype)
