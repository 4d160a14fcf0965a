"""Triton kernels for the fused elementwise ops of a decoder layer, with the signatures of kernels/reference.py:
rms_norm (optionally adding the residual first and writing it back), silu_and_mul, and rotary embedding applied
to q and k in place. One program per token row; math in fp32, results rounded once to the tensor's dtype.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, res_ptr, stride_x, stride_o, stride_r, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_ptr.dtype.element_ty)  # the residual stream keeps the model's dtype
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _matrix(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    x2 = _matrix(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    out2 = out.view(-1, x.shape[-1])
    res2 = x2
    if residual is not None:
        residual = residual if residual.is_contiguous() else residual.contiguous()
        res2 = residual.view(-1, x.shape[-1])
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out2, res2, x2.stride(0), out2.stride(0), res2.stride(0),
                                         x.shape[-1], eps, HAS_RESIDUAL=residual is not None,
                                         BLOCK=triton.next_power_of_2(x.shape[-1]))
    return out if residual is None else (out, residual)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = _matrix(x)
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device) if out is None else out
    out2 = out.view(-1, d)
    block = min(1024, triton.next_power_of_2(d))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out2, x2.stride(0), out2.stride(0), d,
                                                                   BLOCK=block)
    return out


@triton.jit
def _rotate(base, heads, h, i, cos, sin, stride_h, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    mask = (h < heads)[:, None] & (i < HALF)[None, :]
    if INTERLEAVED:
        first = 2 * i
        second = 2 * i + 1
    else:
        first = i
        second = i + HALF
    p1 = base + h[:, None] * stride_h + first[None, :]
    p2 = base + h[:, None] * stride_h + second[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                   q_heads, k_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   INTERLEAVED: tl.constexpr):
    t = tl.program_id(0)
    i = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)
    cos = tl.load(cos_ptr + t * stride_ct + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr + t * stride_qt, q_heads, h, i, cos, sin, stride_qh, HALF, INTERLEAVED)
    _rotate(k_ptr + t * stride_kt, k_heads, h, i, cos, sin, stride_kh, HALF, INTERLEAVED)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [n, heads, d] and k [n, kv_heads, d] in place (they may be strided views of one qkv tensor)."""
    n, q_heads, d = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1, "rotary needs the last dim contiguous"
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    assert cos.stride(0) == sin.stride(0)
    if n:
        _rotary_kernel[(n,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
                             q_heads, k.shape[1], HALF=d // 2,
                             BLOCK_H=triton.next_power_of_2(max(q_heads, k.shape[1])),
                             BLOCK_HALF=triton.next_power_of_2(d // 2), INTERLEAVED=interleaved)
    return q, k
