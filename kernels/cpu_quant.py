"""The weight formats of tokenmill's quantized CPU linears (kernels/cpu_ops.py): GGUF Q4_1 and Q8_0 groups of 32
along K, packed 8 rows at a time as the kernels read them, with their unpacking, exact conversions from float weights
and the linears' plain-torch references (the test oracle; float64 sums).

Q4_1: w = d * q + m, q in 0..15; Q8_0: w = d * q, q in -127..127; d and m float16, one per group. The activation
quantization both linears apply (Q8_1): per row and group, dx = max|x| / 127, q = round(x / dx), sx = dx * sum(q).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

GROUP = 32  # weights and activations are quantized in groups of 32 along K
LANES = 8   # weight rows interleaved per packed block


class PackedQ4_1(NamedTuple):
    """Q4_1 weights [n, K] as the kernel reads them; rows padded to a multiple of 8 and interleaved by 8:
    qs uint8 [n/8, K/32, 128], byte 32j + 4i + t of block b, group g = q[8b+i, 32g+4j+t] | q[8b+i, 32g+16+4j+t] << 4;
    scales float16 [n/8, K/32, 16]: d of the block's 8 rows, then m of them. `q4_1_linear(x, *packed)`."""
    qs: torch.Tensor
    scales: torch.Tensor
    n: int


class PackedQ8_0(NamedTuple):
    """Q8_0 weights [n, K], interleaved by 8 rows: qs int8 [n/8, K/32, 256], byte 32c + 4i + t of block b, group g
    = q[8b+i, 32g+4c+t]; scales float16 [n/8, K/32, 8]."""
    qs: torch.Tensor
    scales: torch.Tensor
    n: int


def _groups_of(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % GROUP:
        raise ValueError(f"weights must be [N, K] with K a multiple of {GROUP}, got {list(w.shape)}")
    return w.float().reshape(w.shape[0], -1, GROUP)


def _as_half(t: torch.Tensor, what: str) -> torch.Tensor:
    h = t.to(torch.float16)
    if not torch.equal(h.float(), t.float()):
        raise ValueError(f"{what} must be exactly representable in float16 (the packed format stores them so)")
    return h


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, -t.shape[0] % LANES))


def _interleave_scales(*per_row: torch.Tensor) -> torch.Tensor:
    """[N, G] each -> [N/8, G, 8 * len(per_row)]: the scales of one block's 8 rows, one tensor after the other."""
    return torch.cat([_pad_rows(s).view(-1, LANES, s.shape[1]).transpose(1, 2) for s in per_row], -1).contiguous()


def q4_1_from_float(w: torch.Tensor, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K], d, m float32 [N, K/32]) with w ~ d * q + m per group of 32: m = the group's min, d = (max -
    min) / 15, both rounded to float16, q = round((w - m) / d). exact=True (for weights that came from Q4_1, such as
    the default GGUF's dequantized ones) raises ValueError unless dequantizing gives back w bit for bit."""
    groups = _groups_of(w)
    m = groups.amin(-1).half().float()
    d = ((groups.amax(-1) - m) / 15).half().float()
    q = torch.where(d[..., None] > 0, torch.round((groups - m[..., None]) / d[..., None]), 0).clamp(0, 15)
    q = q.to(torch.uint8).view(w.shape)
    if exact:
        bad = (_dequantize_q4_1(q, d, m) != w).view(groups.shape).any(-1)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {bad.numel()} groups of 32 are not exactly d * q + m with float16 d"
                             f" and m and q in 0..15")
    return q, d, m


def q8_0_from_float(w: torch.Tensor, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], d float32 [N, K/32]) with w ~ d * q: d = max|w| / 127 rounded to float16, q = round(w / d).
    exact=True raises ValueError unless d * q gives back w bit for bit."""
    groups = _groups_of(w)
    d = (groups.abs().amax(-1) / 127).half().float()
    q = torch.where(d[..., None] > 0, torch.round(groups / d[..., None]), 0).clamp(-127, 127)
    q = q.to(torch.int8).view(w.shape)
    if exact:
        bad = (_dequantize_q8_0(q, d) != w).view(groups.shape).any(-1)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {bad.numel()} groups of 32 are not exactly d * q with float16 d "
                             f"and q in -127..127")
    return q, d


def pack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> PackedQ4_1:
    """q [N, K] integers in 0..15, d and m [N, K/32] (float16-representable) -> the kernel's layout."""
    n, k = q.shape
    if k % GROUP or d.shape != (n, k // GROUP) or m.shape != d.shape:
        raise ValueError(f"q must be [N, K] with K a multiple of {GROUP} and d, m [N, K/{GROUP}]; got q "
                         f"{list(q.shape)}, d {list(d.shape)}, m {list(m.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("Q4_1 values must lie in 0..15")
    # [blocks, row i, group g, half h, j, t] with k = 16h + 4j + t -> [blocks, g, j, i, t, h]
    qb = _pad_rows(q.to(torch.uint8)).view(-1, LANES, k // GROUP, 2, 4, 4).permute(0, 2, 4, 1, 5, 3)
    qs = (qb[..., 0] | (qb[..., 1] << 4)).reshape(-1, k // GROUP, 128).contiguous()
    return PackedQ4_1(qs, _interleave_scales(_as_half(d, "d"), _as_half(m, "m")), n)


def unpack_q4_1(qs: torch.Tensor, scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_q4_1: (q uint8 [n, K], d, m float32 [n, K/32])."""
    blocks, groups = qs.shape[:2]
    halves = torch.stack((qs & 15, qs >> 4), -1).view(blocks, groups, 4, LANES, 4, 2)  # [b, g, j, i, t, h]
    q = halves.permute(0, 3, 1, 5, 2, 4).reshape(blocks * LANES, groups * GROUP)[:n]
    d, m = (scales[..., s * LANES:(s + 1) * LANES].transpose(1, 2).reshape(-1, groups)[:n].float() for s in (0, 1))
    return q, d, m


def _dequantize_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # a product, then a sum, each rounded to float32: how gguf dequantizes Q4_1
    groups = q.float().view(q.shape[0], -1, GROUP)
    return (d[..., None] * groups + m[..., None]).reshape(q.shape)


def dequantize_q4_1(qs: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """Float32 weights [n, K] of packed Q4_1, rounded as gguf's dequantization rounds them."""
    return _dequantize_q4_1(*unpack_q4_1(qs, scales, n))


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> PackedQ8_0:
    """q [N, K] integers in -127..127, d [N, K/32] (float16-representable) -> the kernel's layout."""
    n, k = q.shape
    if k % GROUP or d.shape != (n, k // GROUP):
        raise ValueError(f"q must be [N, K] with K a multiple of {GROUP} and d [N, K/{GROUP}]; got q "
                         f"{list(q.shape)}, d {list(d.shape)}")
    if q.numel() and (int(q.min()) < -127 or int(q.max()) > 127):
        raise ValueError("Q8_0 values must lie in -127..127")
    # [blocks, row i, group g, c, t] with k = 4c + t -> [blocks, g, c, i, t]
    qb = _pad_rows(q.to(torch.int8)).view(-1, LANES, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)
    return PackedQ8_0(qb.reshape(-1, k // GROUP, 256).contiguous(), _interleave_scales(_as_half(d, "d")), n)


def unpack_q8_0(qs: torch.Tensor, scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_q8_0: (q int8 [n, K], d float32 [n, K/32])."""
    blocks, groups = qs.shape[:2]
    q = qs.view(blocks, groups, 8, LANES, 4).permute(0, 3, 1, 2, 4).reshape(blocks * LANES, groups * GROUP)[:n]
    return q, scales.transpose(1, 2).reshape(-1, groups)[:n].float()


def _dequantize_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return (d[..., None] * q.float().view(q.shape[0], -1, GROUP)).reshape(q.shape)


def dequantize_q8_0(qs: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    """Float32 weights [n, K] of packed Q8_0."""
    return _dequantize_q8_0(*unpack_q8_0(qs, scales, n))


def quantize_q8_1_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [..., K], dx, sx float32 [..., K/32]); bit-identical to the op."""
    groups = x.float().reshape(*x.shape[:-1], -1, GROUP)
    dx = groups.abs().amax(-1) / 127
    q = torch.where(dx[..., None] > 0, torch.round(groups / dx[..., None]), 0).clamp(-127, 127)
    return q.to(torch.int8).view(x.shape), dx, dx * q.sum(-1)


def _int_dots(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integer dot products [M, n, G] of x's quantized rows with q's, exact in float64; dx, sx [M, G])."""
    qx, dx, sx = quantize_q8_1_reference(x)
    rows, groups = qx.shape[0], dx.shape[1]
    a = qx.double().view(rows, groups, GROUP).transpose(0, 1)        # [G, M, 32]
    b = q.double().view(-1, groups, GROUP).permute(1, 2, 0)          # [G, 32, n]
    return torch.bmm(a, b).permute(1, 2, 0), dx, sx


def q4_1_linear_reference(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, n: int,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's math, summed in float64 (exact but for the final rounding to float32; the op accumulates in
    float32). Memory grows as rows x n x K/32: for tests."""
    q, d, m = unpack_q4_1(qs, scales, n)
    x2 = x.reshape(-1, x.shape[-1])
    dots, dx, sx = _int_dots(x2, q)
    scale = d[None] * dx[:, None]  # rounded to float32, as the op rounds it
    y = (scale.double() * dots + m[None].double() * sx[:, None].double()).sum(-1)
    y = y.float() if bias is None else y.float() + bias
    return y.view(*x.shape[:-1], n)


def q8_0_linear_reference(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, n: int,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """As q4_1_linear_reference, for Q8_0 weights."""
    q, d = unpack_q8_0(qs, scales, n)
    x2 = x.reshape(-1, x.shape[-1])
    dots, dx, _ = _int_dots(x2, q)
    y = ((d[None] * dx[:, None]).double() * dots).sum(-1)
    y = y.float() if bias is None else y.float() + bias
    return y.view(*x.shape[:-1], n)


__all__ = ["GROUP", "PackedQ4_1", "PackedQ8_0", "dequantize_q4_1", "dequantize_q8_0", "pack_q4_1", "pack_q8_0",
           "q4_1_from_float", "q4_1_linear_reference", "q8_0_from_float", "q8_0_linear_reference",
           "quantize_q8_1_reference", "unpack_q4_1", "unpack_q8_0"]
