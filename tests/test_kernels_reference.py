"""The torch reference attention over a paged cache equals plain causal attention on contiguous tensors."""
import torch
import torch.nn.functional as F

from kernels.reference import decode_attention, prefill_attention, store_kv

H, KVH, D, BS = 6, 2, 16, 4


def _naive(q, k, v, scale):
    """Causal attention of the last q.shape[0] positions over all of k, v; GQA by repetition."""
    n_q, n_k = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // KVH, dim=1)
    v = v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(n_k - n_q, n_k).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(n_k).unsqueeze(0) > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, dim=-1), v)


def _cache(num_blocks=16):
    return torch.zeros(num_blocks, BS, KVH, D), torch.zeros(num_blocks, BS, KVH, D)


def _slots(block_table, start, end):
    return torch.tensor([block_table[p // BS] * BS + p % BS for p in range(start, end)])


def test_store_kv_puts_each_token_in_its_slot():
    k_cache, v_cache = _cache()
    k, v = torch.randn(5, KVH, D), torch.randn(5, KVH, D)
    store_kv(k, v, k_cache, v_cache, _slots([7, 2], 0, 5))
    assert torch.equal(k_cache[7], k[:4]) and torch.equal(k_cache[2, 0], k[4]) and torch.equal(v_cache[2, 0], v[4])


def test_prefill_of_several_sequences_with_and_without_cached_prefix_matches_naive():
    torch.manual_seed(0)
    k_cache, v_cache = _cache()
    tables = [[3, 9, 1], [4, 0, 0], [5, 6, 0]]
    # seq 0: 10 new tokens; seq 1: 3 new tokens; seq 2: 3 tokens cached + 4 new
    lengths, cached = [10, 3, 7], [0, 0, 3]
    full = [(torch.randn(n, H, D), torch.randn(n, KVH, D), torch.randn(n, KVH, D)) for n in lengths]
    for (q, k, v), table, c in zip(full, tables, cached):
        if c:
            store_kv(k[:c], v[:c], k_cache, v_cache, _slots(table, 0, c))
    q = torch.cat([f[0][c:] for f, c in zip(full, cached)])
    k = torch.cat([f[1][c:] for f, c in zip(full, cached)])
    v = torch.cat([f[2][c:] for f, c in zip(full, cached)])
    slots = torch.cat([_slots(t, c, n) for t, c, n in zip(tables, cached, lengths)])
    store_kv(k, v, k_cache, v_cache, slots)
    cu = [0]
    for n, c in zip(lengths, cached):
        cu.append(cu[-1] + n - c)
    out = prefill_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), k_cache, v_cache, torch.tensor(tables),
                            torch.tensor(lengths, dtype=torch.int32), D ** -0.5)
    for i, ((fq, fk, fv), c) in enumerate(zip(full, cached)):
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], _naive(fq[c:], fk, fv, D ** -0.5), atol=1e-5, rtol=1e-5)


def test_decode_attends_to_exactly_context_len_tokens_through_the_block_table():
    torch.manual_seed(1)
    k_cache, v_cache = _cache()
    tables = [[2, 8, 11, 0], [5, 0, 0, 0], [1, 3, 4, 6]]
    lengths = [9, 1, 16]
    ks = [torch.randn(n, KVH, D) for n in lengths]
    vs = [torch.randn(n, KVH, D) for n in lengths]
    for k, v, t, n in zip(ks, vs, tables, lengths):
        store_kv(k, v, k_cache, v_cache, _slots(t, 0, n))
    q = torch.randn(3, H, D)
    out = decode_attention(q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32),
                           torch.tensor(lengths, dtype=torch.int32), D ** -0.5)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], _naive(q[i:i + 1], ks[i], vs[i], D ** -0.5), atol=1e-5, rtol=1e-5)


def test_cpu_decode_in_length_groups_equals_one_padded_batch():
    """Large CPU batches gather K/V in groups of similar lengths; the result stays within float rounding (SDPA's
    CPU kernel splits its work by batch shape, so bit-equality across batch shapes never held)."""
    from kernels.reference import _decode_padded, decode_attention
    g = torch.Generator().manual_seed(0)
    batch, page = 40, 16
    lens = torch.randint(1, 200, (batch,), generator=g)
    width = -(-int(lens.max()) // page)
    k_cache = torch.randn(batch * width, page, 2, 32, generator=g)
    v_cache = torch.randn(batch * width, page, 2, 32, generator=g)
    tables = torch.randperm(batch * width, generator=g).view(batch, width)
    q = torch.randn(batch, 6, 32, generator=g)
    grouped = decode_attention(q, k_cache, v_cache, tables, lens, 0.2)
    torch.testing.assert_close(grouped, _decode_padded(q, k_cache, v_cache, tables, lens, 0.2), rtol=0, atol=1e-6)
