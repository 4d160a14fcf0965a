"""Block manager invariants: allocation covers every token, frees return every block exactly once, and prefix
caching shares computed blocks by content, keeps them after free and evicts least recently freed first."""
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def _seq(n_tokens: int, seq_id: int = 0, start: int = 0) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(range(start, start + n_tokens)), SamplingParams())


def _computed(bm: BlockManager, seq: Sequence) -> None:
    """What a step does once the sequence's tokens are in the cache."""
    seq.num_cached_tokens = seq.num_tokens
    bm.mark_computed(seq)


def test_allocation_covers_every_token_and_free_returns_all_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = _seq(9), _seq(4, 1, start=100)
    assert bm.allocate(a) and bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 4
    bm.free(a)
    bm.free(b)
    assert sorted(bm.free_blocks) == list(range(10)) and a.block_table == [] and a.num_cached_tokens == 0
    assert bm.usage == 0


def test_append_takes_a_new_block_only_when_the_last_is_full():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = _seq(4)
    bm.allocate(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 1  # 4 tokens fit the first block
    seq.output_token_ids.append(1)  # token 5 needs a second block
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2


def test_cannot_allocate_or_append_beyond_the_pool():
    bm = BlockManager(num_blocks=2, block_size=4)
    big = _seq(9)
    assert not bm.allocate(big) and big.block_table == [] and bm.num_free_blocks == 2
    seq = _seq(8)
    assert bm.allocate(seq)
    seq.output_token_ids.append(1)
    assert not bm.can_append(seq)
    assert bm.usage == 1.0


def test_a_shared_prefix_reuses_computed_blocks_and_counts_references():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _seq(10)
    bm.allocate(a)
    assert a.num_cached_tokens == 0  # nothing computed yet: no hit
    _computed(bm, a)  # blocks 0 and 1 (tokens 0-7) are full and computed; block 2 is partial
    b = _seq(11)  # same first 10 tokens, one more
    assert bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert b.block_table[2] != a.block_table[2]  # a partial block is never shared
    assert bm.prefix_queries == 21 and bm.prefix_hits == 8
    bm.free(a)
    assert bm.num_free_blocks == 10 - 3  # the shared blocks are still held by b
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_a_different_token_early_on_changes_every_later_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _seq(12)
    bm.allocate(a)
    _computed(bm, a)
    b = Sequence(1, "1", 0, [0, 1, 2, 99] + list(range(4, 12)), SamplingParams())  # differs in block 0 only
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(b.block_table) & set(a.block_table)


def test_the_last_token_is_always_computed():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = _seq(8)
    bm.allocate(a)
    _computed(bm, a)
    again = _seq(8, 1)
    bm.allocate(again)
    assert again.num_cached_tokens == 4  # not 8: the logits of token 8 are needed


def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _seq(5), _seq(5, 1, start=50)
    for s in (a, b):
        bm.allocate(s)
        _computed(bm, s)
    a_prefix, b_prefix = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    assert bm.usage == 0
    c = _seq(5, 2, start=200)  # two fresh blocks: the two uncached partial blocks go first
    bm.allocate(c)
    assert a_prefix not in c.block_table and b_prefix not in c.block_table
    d = _seq(5, 3, start=300)  # needs two more: evicts a's prefix block (freed before b's), then b's
    assert bm.allocate(d) and set(d.block_table) == {a_prefix, b_prefix}
    bm.free(d)
    again = _seq(5)
    bm.allocate(again)
    assert again.num_cached_tokens == 0  # a's prefix was evicted


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = _seq(10)
    bm.allocate(a)
    _computed(bm, a)
    b = _seq(10, 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert bm.prefix_queries == 0
