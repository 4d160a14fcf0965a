"""Continuous batching in separate prefill and decode steps, with chunked prefill.

Queues: `waiting` (no KV blocks), `prefilling` (blocks held, prompt partly computed), `running` (decoding).
A prefill step computes up to max_num_batched_tokens prompt tokens: first the prompts already under way (oldest
first), then newly admitted ones, whose cached prefix (prefix caching) is skipped; a long prompt is cut into
chunks across steps. A decode step computes one token for every running sequence.

Policy: while sequences decode, prefill and decode steps alternate. A running stream then waits at most one
prefill chunk between two tokens (the chunk size bounds inter-token latency), and a new prompt waits at most one
decode step before its next chunk (which keeps time to first token low). With nothing decoding, prefill steps run
back to back.
"""
import logging
import time
from collections import deque

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._last_was_prefill = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step (each with num_scheduled_tokens set) and whether it is a prefill."""
        wants_prefill = bool(self.prefilling or self.waiting)
        if wants_prefill and not (self.running and self._last_was_prefill):
            scheduled = self._schedule_prefill()
            if scheduled:
                self._last_was_prefill = True
                return scheduled, True
        self._last_was_prefill = False
        scheduled = self._schedule_decode()
        if not scheduled and wants_prefill:  # everything decoding was preempted
            scheduled = self._schedule_prefill()
            self._last_was_prefill = bool(scheduled)
            return scheduled, bool(scheduled)
        return scheduled, False

    def _schedule_prefill(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        for seq in self.prefilling:
            if budget == 0:
                break
            seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_cached_tokens, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
        under_way = {seq.request_id for seq in self.prefilling}
        siblings: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) + len(self.prefilling) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.request_id in under_way and self.block_manager.enable_prefix_caching:
                # n > 1: the other samples wait for this prompt's blocks, then share them from the cache; the
                # requests behind them go on (one sample per request per step, not one per step in all)
                siblings.append(self.waiting.popleft())
                continue
            if not self.block_manager.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.prefilling.append(seq)
            under_way.add(seq.request_id)
            seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_cached_tokens, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
        self.waiting.extendleft(reversed(siblings))  # back in front, in their order
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                # free blocks: a prompt under way first (it has produced nothing yet), else the newest stream
                if self.prefilling:
                    self._preempt(self.prefilling.pop())
                elif self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append_slot(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def will_sample(self, seq: Sequence) -> bool:
        """Whether this step computes the sequence's last token (else it is a prefill chunk with more to come)."""
        return seq.num_cached_tokens + seq.num_scheduled_tokens == seq.num_tokens

    def commit(self, seqs: list[Sequence]) -> None:
        """After a step: its tokens' K/V are in the cache; prompts that are complete start decoding."""
        for seq in seqs:
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            self.block_manager.mark_computed(seq)
        for seq in [s for s in self.prefilling if s.num_cached_tokens == s.num_tokens]:
            self.prefilling.remove(seq)
            self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the sequence's blocks (its computed full blocks stay in the prefix cache);
        it is prefilled again (prompt + output) later."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug("preempted sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        for queue in (self.running, self.prefilling, self.waiting):
            if seq in queue:
                queue.remove(seq)
                break
