"""Triton kernels for attention over the paged KV cache, with the signatures of kernels/reference.py.

- store_kv: one program per new token copies its K and V rows into their cache slots (slot < 0: skipped).
- decode_attention: split-KV over fixed DECODE_SPLIT-token slices. Program (sequence, KV head, split) puts the
  query heads sharing that KV head in the rows of a [16+, D] tile (GQA without copying K/V; padding rows are zero)
  and walks its slice in tiles of whole pages (one block-table load per page): scores = tl.dot(q, K^T), then
  tl.dot(p, V), with an online softmax. The grid is sized from the block-table width; programs read their context
  length on the device and those past the end return, so nothing waits on the host (CUDA-graph safe). A second
  kernel merges the splits in a fixed order. Split size and merge order never depend on the batch, so a sequence
  gets the same bits alone or in any batch.
- prefill_attention: variable-length causal attention. Program (sequence, head, query tile) reads every key it
  may see from the paged cache (the new tokens are stored first), so plain prefill, chunked prefill and a cached
  prefix are the same case.
Softmax statistics and accumulators are fp32. fp16/bf16 tl.dot operands go in natively on a GPU; fp32 ones use
input_precision="ieee". Under TRITON_INTERPRET=1 (CI, CPU tensors) the operands are cast to fp32, because the
interpreter multiplies bf16 bit patterns wrongly (triton-lang/triton#11584).
"""
import os

import torch
import triton
import triton.language as tl

DECODE_SPLIT = 256  # context tokens per decode partition on a GPU
DECODE_TILE = 64  # K/V tokens per step of a decode program (widened to a page of up to 128)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, ROW, 0)
    tl.store(k_cache_ptr + slot * ROW + offs, tl.load(k_ptr + t * stride_k + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, tl.load(v_ptr + t * stride_v + offs, mask=mask), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [n, heads, d] as a view whose token rows are contiguous (copied only when they are not)."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if k.shape[0] == 0:
        return
    k, v = _rows(k), _rows(v)
    row = k.shape[1] * k.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2] * k_cache.shape[3] == row
    _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), ROW=row,
                                    BLOCK=triton.next_power_of_2(row))


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                         part_out_ptr, part_m_ptr, part_l_ptr, qk_scale, num_heads, max_splits,
                         stride_qb, stride_qh, stride_bt, stride_cb, stride_ct, stride_ch,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         PAGE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr, PER_PAGE: tl.constexpr,
                         DOT_FP32: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    start = s * SPLIT
    if start >= ctx:  # past this sequence's end: the merge reads nothing from this split
        return
    end = tl.minimum(start + SPLIT, ctx)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + g
    # the query heads of this KV head are the rows of both dots; padding rows are zeros and are never stored
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, in log2 units
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + b * stride_bt
    for t0 in range(start, end, TILE):
        t = t0 + tl.arange(0, TILE)
        t_mask = t < end
        if PER_PAGE:  # the tile is whole pages: one block-table entry per page
            pages = t0 // PAGE + tl.arange(0, TILE // PAGE)
            block = tl.load(table + pages, mask=pages * PAGE < end, other=0).to(tl.int64)
            rows = tl.reshape(block[:, None] * stride_cb + tl.arange(0, PAGE)[None, :] * stride_ct, [TILE])
        else:
            block = tl.load(table + t // PAGE, mask=t_mask, other=0).to(tl.int64)
            rows = block * stride_cb + (t % PAGE) * stride_ct
        offs = (rows + kvh * stride_ch)[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
        if DOT_FP32:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(t_mask[None, :], scores * qk_scale, float("-inf"))  # [BLOCK_G, TILE]
        m_new = tl.maximum(m, tl.max(scores, axis=1))  # finite: a tile holds at least one token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    part = (b * num_heads + heads).to(tl.int64) * max_splits + s
    tl.store(part_m_ptr + part, m, mask=g_mask)
    tl.store(part_l_ptr + part, l, mask=g_mask)
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_m_ptr, part_l_ptr, context_lens_ptr, out_ptr, num_heads, max_splits,
                         stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         CHUNK: tl.constexpr, SPLIT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.cdiv(tl.load(context_lens_ptr + b), SPLIT)  # the splits that wrote partials
    base = (b * num_heads + h).to(tl.int64) * max_splits
    c = tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    # Splits go CHUNK at a time, each lane summing its splits in order: the same additions in the same order
    # whatever max_splits (the batch's widest block table) is.
    top = tl.full([CHUNK], float("-inf"), tl.float32)
    for s0 in range(0, n, CHUNK):
        top = tl.maximum(top, tl.load(part_m_ptr + base + s0 + c, mask=s0 + c < n, other=float("-inf")))
    top = tl.max(top, axis=0)
    l = tl.zeros([CHUNK], tl.float32)
    acc = tl.zeros([CHUNK, BLOCK_D], tl.float32)
    for s0 in range(0, n, CHUNK):
        s = s0 + c
        s_mask = s < n
        w = tl.where(s_mask, tl.exp2(tl.load(part_m_ptr + base + s, mask=s_mask, other=0.0) - top), 0.0)
        l += w * tl.load(part_l_ptr + base + s, mask=s_mask, other=0.0)
        acc += w[:, None] * tl.load(part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(l, axis=0)
    o = tl.sum(acc, axis=0) / tl.where(total > 0, total, 1.0)  # no context: zeros, not NaN
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def _decode_plan(page: int) -> tuple[int, int, int, bool]:
    """(split, tile, merge chunk, per_page), fixed by the page size alone. With a power-of-two page of at most 128
    tokens a tile is whole pages (one block-table load per page); otherwise each token looks its page up. The
    interpreter gets small sizes so that a test context spans several splits, tiles and merge chunks cheaply."""
    split, tile, chunk = (64, 32, 2) if _interpreting() else (DECODE_SPLIT, DECODE_TILE, 16)
    per_page = page & (page - 1) == 0 and page <= 128  # a tile of a larger page would not fit in shared memory
    if per_page:
        tile = max(tile, page)
    return max(split, tile), tile, chunk, per_page


def decode_workspace_size(batch: int, num_heads: int, head_dim: int, max_blocks: int, page: int) -> int:
    """float32 elements decode_attention's `workspace` needs for this batch and block-table width; a buffer sized
    for the largest batch and width (a CUDA graph's) serves every smaller call."""
    return batch * num_heads * max(1, triton.cdiv(max_blocks * page, _decode_plan(page)[0])) * (head_dim + 2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                     workspace: torch.Tensor | None = None) -> torch.Tensor:
    """workspace: a float32 buffer of at least decode_workspace_size(...) elements for the per-split partials;
    without it they are allocated."""
    batch, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    q = q if q.stride(2) == 1 else q.contiguous()
    split, tile, chunk, per_page = _decode_plan(page)
    # the grid has every split the block table could need (no device-to-host sync for the longest context);
    # the splits past a sequence's end return at once
    max_splits = max(1, triton.cdiv(block_tables.shape[1] * page, split))
    n = batch * num_heads * max_splits
    size = n * (head_dim + 2)
    if workspace is None:
        workspace = torch.empty(size, dtype=torch.float32, device=q.device)
    assert workspace.dtype == torch.float32 and workspace.is_contiguous() and workspace.numel() >= size
    part_out, part_m, part_l = workspace[:size].split([n * head_dim, n, n])
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(batch, num_kv_heads, max_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_out, part_m, part_l, scale * 1.4426950408889634,
        num_heads, max_splits, q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=page, TILE=tile, SPLIT=split, PER_PAGE=per_page,
        DOT_FP32=_interpreting() or q.dtype == torch.float32)
    _decode_merge_kernel[(batch, num_heads)](
        part_out, part_m, part_l, context_lens, out, num_heads, max_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, CHUNK=chunk, SPLIT=split)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_q_ptr, context_lens_ptr, block_tables_ptr, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_cb, stride_ct, stride_ch,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    n_q = tl.load(cu_q_ptr + b + 1) - q_start
    ctx = tl.load(context_lens_ptr + b)
    prefix = ctx - n_q  # tokens cached before this chunk
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_mask = rows < n_q
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = prefix + rows
    kvh = h // GROUP
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # causal: this tile's last row sees keys up to its own position; a tile past the chunk sees none
    kv_end = tl.where(tile * BLOCK_M < n_q, tl.minimum(ctx, prefix + (tile + 1) * BLOCK_M), 0)
    for n0 in range(0, kv_end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        t_mask = t < kv_end
        page = tl.load(block_tables_ptr + b * stride_bt + t // PAGE, mask=t_mask, other=0).to(tl.int64)
        offs = page * stride_cb + (t % PAGE) * stride_ct + kvh * stride_ch
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        # rows past the chunk sit at positions >= ctx, so they see every key and stay finite
        scores = tl.where((t[None, :] <= q_pos[:, None]) & t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    o = acc / tl.where(l > 0, l, 1.0)[:, None]  # l = 0 only in rows past the chunk, which are not stored
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, scale: float, max_seqlen_q: int | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """k and v are unused: the new tokens are read back from the cache, where store_kv has put them. Give
    max_seqlen_q when it is known: working it out from cu_seqlens_q waits for the device."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    batch = context_lens.shape[0]
    if batch == 0 or num_tokens == 0:
        return out
    q = q if q.stride(2) == 1 else q.contiguous()
    group = num_heads // k_cache.shape[2]
    longest = max_seqlen_q if max_seqlen_q is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    dot_fp32 = _interpreting() or q.dtype == torch.float32
    block_m = 16 if _interpreting() else 64
    block_n = 16 if _interpreting() else 64
    _prefill_kernel[(batch, num_heads, triton.cdiv(longest, block_m))](
        q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, scale, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=dot_fp32)
    return out
