"""Plain-torch reference implementation of the attention backend over a paged KV cache.

Cache layout: one tensor per layer for K and one for V, [num_blocks, block_size, num_kv_heads, head_dim].
The token at position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
The caches may hold a narrower dtype than q, k and v (a float16 cache for a float32 model): values are rounded as
they are stored and widened to q's dtype as they are read.
"""
import torch
import torch.nn.functional as F


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into the cache slots named by slot_mapping; a slot < 0
    (a padding token) writes nothing."""
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence, [length, num_kv_heads, head_dim]."""
    num_blocks = -(-length // cache.shape[1])
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, scale: float, max_seqlen_q: int | None = None) -> torch.Tensor:
    """Causal attention for a flat batch of variable-length query chunks.

    q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim] are the new tokens (already
    stored in the cache). cu_seqlens_q [batch + 1] and context_lens [batch] are int32 tensors: sequence i owns rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1] and has context_lens[i] tokens in all; when that is more than its query rows,
    the earlier tokens are read from the cache (a cached prefix). max_seqlen_q (the longest chunk) is for kernels
    that size their grid with it.
    """
    out = torch.empty_like(q)
    cu_seqlens_q = cu_seqlens_q.tolist()
    for i, ctx in enumerate(context_lens.tolist()):
        start, end = cu_seqlens_q[i], cu_seqlens_q[i + 1]
        n_q = end - start
        qi = q[start:end].transpose(0, 1).unsqueeze(0)
        if ctx == n_q and k_cache.dtype == q.dtype:
            ki, vi, mask, causal = k[start:end], v[start:end], None, True
        else:  # a cached prefix, or a narrower cache whose rounded values every row must see
            ki = _gather(k_cache, block_tables[i], ctx).to(q.dtype)
            vi = _gather(v_cache, block_tables[i], ctx).to(q.dtype)
            # query row r sits at position ctx - n_q + r and sees keys up to and including that position
            q_pos = torch.arange(ctx - n_q, ctx, device=q.device).unsqueeze(1)
            mask, causal = torch.arange(ctx, device=q.device).unsqueeze(0) <= q_pos, False
        ki, vi = ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=True)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


_DECODE_GROUP = 16  # sequences gathered together on the CPU


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence, q [batch, num_heads, head_dim], attending to its context_lens cached tokens.

    block_tables [batch, max_blocks] is padded with any valid block id; padding is masked by context_lens.
    """
    batch = q.shape[0]
    if batch <= _DECODE_GROUP or q.device.type != "cpu":
        return _decode_padded(q, k_cache, v_cache, block_tables, context_lens, scale)
    # Copying K/V out of the cache dominates large CPU batches, and padding every sequence to the longest context
    # copies much that is masked away: gather groups of similar lengths, each up to its own longest (masked keys
    # add zeros; only SDPA's own batch-shaped work split moves results, by float rounding).
    page = k_cache.shape[1]
    lens = context_lens.tolist()
    order = sorted(range(batch), key=lens.__getitem__)
    groups = [order[i:i + _DECODE_GROUP] for i in range(0, batch, _DECODE_GROUP)]
    widths = [-(-lens[g[-1]] // page) for g in groups]
    if sum(w * len(g) for w, g in zip(widths, groups)) > 0.7 * batch * block_tables.shape[1]:
        # lengths too alike for the saving to pay for the extra calls
        return _decode_padded(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = torch.empty_like(q)
    for rows, width in zip(groups, widths):
        index = torch.tensor(rows, device=q.device)
        out[index] = _decode_padded(q[index], k_cache, v_cache, block_tables[index, :width], context_lens[index],
                                    scale)
    return out


def _decode_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = block_tables.shape[1] * k_cache.shape[1]
    # [batch, max_len, kv_heads, d] -> [batch, kv_heads, max_len, d]; index_select gathers much faster on CPU
    # than advanced indexing (about 10x for bf16)
    flat_tables = block_tables.reshape(-1)
    k = k_cache.index_select(0, flat_tables).view(batch, max_len, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, flat_tables).view(batch, max_len, num_kv_heads, head_dim).transpose(1, 2)
    k, v = k.to(q.dtype), v.to(q.dtype)
    # the heads that share a KV head become that head's query rows: no repeat of K/V needed
    qg = q.view(batch, num_kv_heads, group, head_dim)
    mask = (torch.arange(max_len, device=q.device) < context_lens.unsqueeze(1)).view(batch, 1, 1, max_len)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return o.reshape(batch, num_heads, head_dim)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim. With `residual`: first residual = x + residual, then normalise that, and return
    (normalised, new residual), the pre-norm residual stream of a decoder layer."""
    if residual is not None:
        # residual first: the sum takes the layout of its first operand, and x may be a transposed view
        # (models/cpu_linear.py) on which the norm runs 2x slower
        residual = residual + x
        return F.rms_norm(residual, weight.shape, weight, eps=eps), residual
    # one fused op that accumulates in float32
    return F.rms_norm(x, weight.shape, weight, eps=eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: x [..., 2 * d] holds gate then up; returns silu(gate) * up [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [n, heads, d] and k [n, kv_heads, d] with cos, sin [n, d / 2].

    neox layout (interleaved=False, Llama/Qwen in HF): dims i and i + d/2 form a pair; gpt-j layout
    (interleaved=True): dims 2i and 2i + 1. Returns new tensors (the Triton version rotates in place)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rotate(q), rotate(k)
