"""Triton kernel of kernels/lora.py's lora_delta: one program per (token, block of output columns) gathers its
token's adapter (BGMV, as Punica and vLLM call it): t = A[s] @ x in float32 over blocks of the input, then
out = scale[s] * B[s][cols] @ t. Tokens of slot 0 write zeros. Ranks are padded to a power of two (>= 16) by the
caller's stacks. Under TRITON_INTERPRET=1 it runs on CPU tensors (the tests' oracle is the torch reference)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _lora_kernel(x_ptr, slots_ptr, a_ptr, b_ptr, scales_ptr, out_ptr, IN, OUT,
                 R: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    slot = tl.load(slots_ptr + token)
    ranks = tl.arange(0, R)
    hidden = tl.zeros((R,), dtype=tl.float32)
    for start in range(0, IN, BLOCK_IN):
        k = start + tl.arange(0, BLOCK_IN)
        x = tl.load(x_ptr + token * IN + k, mask=k < IN, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + slot * R * IN + ranks[:, None] * IN + k[None, :], mask=k[None, :] < IN,
                    other=0.0).to(tl.float32)
        hidden += tl.sum(a * x[None, :], axis=1)
    b = tl.load(b_ptr + slot * OUT * R + cols[:, None] * R + ranks[None, :], mask=cols[:, None] < OUT,
                other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + slot).to(tl.float32)
    out = tl.sum(b * hidden[None, :], axis=1) * scale
    out = tl.where(slot == 0, 0.0, out)
    tl.store(out_ptr + token * OUT + cols, out.to(out_ptr.dtype.element_ty), mask=cols < OUT)


def lora_delta_triton(x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      scales: torch.Tensor) -> torch.Tensor:
    tokens, size_in = x.shape
    rank, size_out = a.shape[1], b.shape[1]
    if rank & (rank - 1) or rank < 16:
        raise ValueError(f"the stacked rank must be a power of two >= 16, got {rank}")
    out = torch.empty(tokens, size_out, dtype=x.dtype, device=x.device)
    block_out = 64
    _lora_kernel[(tokens, triton.cdiv(size_out, block_out))](
        x.contiguous(), slots.to(torch.int32).contiguous(), a.contiguous(), b.contiguous(), scales.contiguous(), out,
        size_in, size_out, R=rank, BLOCK_IN=64, BLOCK_OUT=block_out)
    return out
