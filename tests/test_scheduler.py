"""Scheduler: prefill first within budgets, decode for all running, newest preempted when blocks run out."""
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def _seq(seq_id: int, n_tokens: int) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(range(n_tokens)), SamplingParams())


def _run_step(seqs, is_prefill):
    for s in seqs:  # what the engine does after sampling
        s.num_cached_tokens = s.num_tokens
        s.output_token_ids.append(0)


def test_prefill_batches_respect_the_token_budget_and_max_num_seqs():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=3, max_num_batched_tokens=20)
    seqs = [_seq(i, 8) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == seqs[:2]  # a third 8-token prompt would pass the 20-token budget
    _run_step(batch, True)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == seqs[2:3]  # max_num_seqs = 3
    _run_step(batch, True)
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == seqs[:3]


def test_newest_running_sequence_is_preempted_when_blocks_run_out():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    old, new = _seq(0, 8), _seq(1, 8)
    sched.add(old)
    sched.add(new)
    batch, _ = sched.schedule()
    assert batch == [old, new]
    _run_step(batch, True)  # both now need a third block for their 9th token; the pool is empty
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [old]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and sched.waiting[0] is new
    assert sched.num_preemptions == 1 and new.num_preemptions == 1


def test_finish_frees_blocks_and_leaves_the_queues():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seq = _seq(0, 5)
    sched.add(seq)
    sched.schedule()
    sched.finish(seq, "stop")
    assert bm.num_free_blocks == 4 and not sched.has_unfinished() and seq.finish_reason == "stop"
