"""Block manager invariants: allocation covers every token, frees return every block exactly once."""
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def _seq(n_tokens: int, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(range(n_tokens)), SamplingParams())


def test_allocation_covers_every_token_and_free_returns_all_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = _seq(9), _seq(4, 1)
    bm.allocate(a)
    bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 4
    bm.free(a)
    bm.free(b)
    assert sorted(bm.free_blocks) == list(range(10)) and a.block_table == [] and a.num_cached_tokens == 0


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
    assert not bm.can_allocate(_seq(9))
    seq = _seq(8)
    bm.allocate(seq)
    seq.output_token_ids.append(1)
    assert not bm.can_append(seq)
    assert bm.usage == 1.0
