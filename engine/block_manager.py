"""Paged KV cache bookkeeping: fixed-size blocks, a free list, and each sequence's block table."""
from collections import deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token the sequence has (a prompt, or a preempted sequence being recomputed)."""
        assert not seq.block_table, "sequence already holds blocks"
        seq.block_table = [self.free_blocks.popleft() for _ in range(self.blocks_needed(seq.num_tokens))]

    def can_append(self, seq: Sequence) -> bool:
        """Room for the token the next decode step writes (the sequence's last one)."""
        return len(seq.block_table) >= self.blocks_needed(seq.num_tokens) or bool(self.free_blocks)

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0
