"""Scheduler: prefill within the token budget (chunking long prompts), alternating with decode while streams
run, newest preempted when blocks run out, n > 1 siblings waiting for their prompt's blocks."""
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def _seq(seq_id: int, n_tokens: int, request: str | None = None, index: int = 0) -> Sequence:
    return Sequence(seq_id, request or str(seq_id), index, [1000 * seq_id + t for t in range(n_tokens)],
                    SamplingParams())


def _run_step(sched: Scheduler, seqs: list[Sequence]) -> None:
    """What the engine does after the model ran: sample for finished prompts and decodes, then commit."""
    sampling = [s for s in seqs if sched.will_sample(s)]
    sched.commit(seqs)
    for s in sampling:
        s.output_token_ids.append(0)


def test_prefill_batches_respect_the_token_budget_and_max_num_seqs():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=3, max_num_batched_tokens=20)
    seqs = [_seq(i, 8) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch, is_prefill = sched.schedule()
    # 8 + 8 + 4: the third prompt gets the budget's last 4 tokens as a first chunk
    assert is_prefill and batch == seqs[:3] and [s.num_scheduled_tokens for s in batch] == [8, 8, 4]
    _run_step(sched, batch)
    assert [len(s.output_token_ids) for s in seqs[:3]] == [1, 1, 0]
    batch, is_prefill = sched.schedule()  # streams are decoding, so a decode step comes next
    assert not is_prefill and batch == seqs[:2]
    _run_step(sched, batch)
    batch, is_prefill = sched.schedule()  # then the rest of the third prompt; max_num_seqs = 3 admits no more
    assert is_prefill and batch == seqs[2:3] and seqs[2].num_scheduled_tokens == 4
    _run_step(sched, batch)
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == seqs[:3]


def test_a_long_prompt_is_chunked_and_alternates_with_decodes():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=6)
    short, long = _seq(0, 3), _seq(1, 20)
    sched.add(short)
    batch, _ = sched.schedule()
    _run_step(sched, batch)
    sched.add(long)
    kinds, chunks = [], []
    while len(long.output_token_ids) == 0:
        batch, is_prefill = sched.schedule()
        kinds.append(is_prefill)
        if is_prefill:
            chunks.append(long.num_scheduled_tokens)
        _run_step(sched, batch)
    # the step before was the short prompt's prefill, so a decode comes first
    assert chunks == [6, 6, 6, 2] and kinds == [False, True] * 4
    assert len(short.output_token_ids) == 1 + 4  # one token per decode step in between


def test_newest_running_sequence_is_preempted_when_blocks_run_out():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    old, new = _seq(0, 8), _seq(1, 8)
    sched.add(old)
    sched.add(new)
    batch, _ = sched.schedule()
    assert batch == [old, new]
    _run_step(sched, batch)  # both now need a third block for their 9th token; the pool is empty
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [old]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and sched.waiting[0] is new
    assert sched.num_preemptions == 1 and new.num_preemptions == 1


def test_samples_of_one_request_wait_for_its_prompt_then_share_its_blocks():
    bm = BlockManager(100, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    first, second = _seq(0, 10, "r", 0), _seq(1, 10, "r", 1)
    second.prompt_token_ids = list(first.prompt_token_ids)
    sched.add(first)
    sched.add(second)
    batch, _ = sched.schedule()
    assert batch == [first]
    _run_step(sched, batch)
    batch, is_prefill = sched.schedule()  # a decode for `first`, then `second` reuses the two full blocks
    assert not is_prefill
    _run_step(sched, batch)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == [second] and second.num_cached_tokens == 8 and second.num_scheduled_tokens == 2
    assert second.block_table[:2] == first.block_table[:2]


def test_waiting_samples_do_not_hold_back_the_requests_behind_them():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = [_seq(i, 6, "a", i) for i in range(3)]
    b = [_seq(3 + i, 6, "b", i) for i in range(3)]
    for s in a[1:] + b[1:]:
        s.prompt_token_ids = list((a if s in a else b)[0].prompt_token_ids)
    for s in a + b:
        sched.add(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == [a[0], b[0]]  # one sample of each request; the others wait, in order
    assert list(sched.waiting) == a[1:] + b[1:]


def test_finish_frees_blocks_and_leaves_the_queues():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    seq = _seq(0, 5)
    sched.add(seq)
    sched.schedule()
    sched.finish(seq, "stop")
    assert bm.num_free_blocks == 4 and not sched.has_unfinished() and seq.finish_reason == "stop"
