"""Paged KV cache bookkeeping: fixed-size blocks with reference counts, each sequence's block table, and automatic
prefix caching.

A full block whose K/V have been computed is keyed by a chained hash of every token up to its end, so equal
prefixes map to equal keys. A new sequence takes the cached blocks of its longest cached prefix (sharing them:
ref counts) and fresh blocks for the rest. A block nobody uses any more stays cached in the free pool; fresh
allocations take the least recently freed block first, evicting its cached content only then.
"""
from collections import OrderedDict

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # prefix hash -> block id holding those tokens' K/V
        # blocks with ref count 0, least recently freed first (the order of eviction)
        self.free_pool: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0     # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_pool)

    @property
    def free_blocks(self) -> list[int]:
        return list(self.free_pool)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached blocks nobody holds count as free)."""
        return 1.0 - len(self.free_pool) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of the sequence's first num_blocks full blocks (reusing those already known)."""
        hashes = seq.block_hashes[:num_blocks]
        tokens = seq.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            # Python's tuple hash: 64 bits, deterministic for ints; the chain makes a block's key depend on
            # everything before it
            # the chain starts from the adapter: equal tokens under two adapters have different K/V
            hashes.append(hash((hashes[-1] if hashes else seq.lora_name, tuple(tokens[i * bs:(i + 1) * bs]))))
        return hashes

    def allocate(self, seq: Sequence) -> bool:
        """Blocks for every token the sequence has (a prompt, or a preempted sequence being recomputed): cached
        ones for its longest cached prefix, fresh ones for the rest. Sets seq.num_cached_tokens to the tokens
        whose K/V are found. Returns False, changing nothing, when the free blocks do not suffice."""
        assert not seq.block_table, "sequence already holds blocks"
        total = self.blocks_needed(seq.num_tokens)
        hits: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching and not seq.wants_prompt_logprobs:
            # at least the last token must be computed: its logits give the next token
            hashes = self._prefix_hashes(seq, (seq.num_tokens - 1) // self.block_size)
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                hits.append(block)
        reused_free = sum(self.ref_counts[b] == 0 for b in hits)
        if total - len(hits) > len(self.free_pool) - reused_free:
            return False
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_pool[block]
            self.ref_counts[block] += 1
        fresh = [self._take_free_block() for _ in range(total - len(hits))]
        seq.block_table = hits + fresh
        seq.block_hashes = hashes[:len(hits)]  # exactly the blocks already computed
        seq.num_cached_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_cached_tokens
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free_pool.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its cached content
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def mark_computed(self, seq: Sequence) -> None:
        """Register the sequence's full blocks whose K/V are now all written (after a step), so that later
        sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_cached_tokens // self.block_size, len(seq.block_table))
        if full <= len(seq.block_hashes):
            return
        known = len(seq.block_hashes)
        seq.block_hashes = self._prefix_hashes(seq, full)
        for i in range(known, full):
            block, h = seq.block_table[i], seq.block_hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (after the weights changed, their K/V are stale). Only with no sequence
        holding blocks."""
        if any(self.ref_counts):
            raise RuntimeError("reset_prefix_cache while sequences hold blocks")
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks

    def can_append(self, seq: Sequence) -> bool:
        """Room for the token the next decode step writes (the sequence's last one)."""
        return len(seq.block_table) >= self.blocks_needed(seq.num_tokens) or bool(self.free_pool)

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_free_block())

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens (speculative proposals); False, changing nothing, when too few are free."""
        more = self.blocks_needed(num_tokens) - len(seq.block_table)
        if more > len(self.free_pool):
            return False
        for _ in range(more):
            seq.block_table.append(self._take_free_block())
        return True

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past the sequence's tokens (those of rejected proposals)."""
        while len(seq.block_table) > self.blocks_needed(seq.num_tokens):
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] == 0, "a proposal's block is shared"
            self.free_pool[block] = None
            self.free_pool.move_to_end(block, last=False)  # it holds nothing worth keeping

    def free(self, seq: Sequence) -> None:
        # last blocks first, so that a prefix's first blocks are evicted last
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_pool[block] = None
                if self.block_hash[block] is None:  # nothing worth keeping: reuse it first
                    self.free_pool.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_cached_tokens = 0
