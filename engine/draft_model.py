"""The draft model of speculative decoding (`{"method": "draft_model", "model": PATH}`): a small model with the
target's vocabulary (a student from `tokenmill train distill` is one) proposes k tokens greedily.

It keeps its own paged KV cache: each target sequence has a mirror sequence here. Before proposing, the mirror
takes the target's tokens; the K/V it computed for a prefix the target kept stay, the rest (proposals the target
rejected) are recomputed in one prefill with the new tokens, then k - 1 decode steps finish the proposal. All
mirrors of a step go through each forward together."""
import logging

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

logger = logging.getLogger(__name__)
_GREEDY = SamplingParams(temperature=0, max_tokens=None)


class DraftModel:
    def __init__(self, path: str, target):
        from engine.llm_engine import LLMEngine  # the draft is loaded as an engine of its own, minus its scheduler
        from models.loading import load_tokenizer
        _check_vocabulary(load_tokenizer(path), target.tokenizer)  # before any weight is read
        cfg = target.config
        self.engine = LLMEngine(EngineConfig(
            model=path, dtype=cfg.dtype, device=cfg.device, attention_backend=cfg.attention_backend,
            num_kv_blocks=target.block_manager.num_blocks, block_size=cfg.block_size,
            enable_prefix_caching=False,
            enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs))
        self.target = target
        self.mirrors: dict[int, Sequence] = {}

    def propose(self, seqs: list[Sequence], k: int) -> dict[int, list[int]]:
        self._drop_finished()
        bm, limit = self.engine.block_manager, self.engine.max_model_len  # the draft's own (past it: no proposal)
        ready = []
        for seq in seqs:
            tokens = seq.all_token_ids
            if len(tokens) + k > limit:
                continue
            mirror = self.mirrors.get(seq.seq_id)
            if mirror is None:
                mirror = Sequence(seq.seq_id, seq.request_id, 0, list(tokens), _GREEDY)
                if not bm.allocate(mirror):
                    continue
                self.mirrors[seq.seq_id] = mirror
            else:
                kept = _common_prefix(mirror.all_token_ids[:mirror.num_cached_tokens], tokens)
                mirror.prompt_token_ids, mirror.output_token_ids = list(tokens), []
                mirror.num_cached_tokens = min(kept, len(tokens) - 1)  # the last token's logits are needed
            if not bm.reserve(mirror, len(tokens) + k):
                continue
            mirror.num_scheduled_tokens = mirror.num_tokens - mirror.num_cached_tokens
            ready.append(mirror)
        if not ready:
            return {}
        runner, sampler = self.engine.runner, self.engine.sampler
        logits = runner.run(ready, True)
        for _ in range(k):
            for mirror in ready:
                mirror.num_cached_tokens += mirror.num_scheduled_tokens
                mirror.num_scheduled_tokens = 1
            for mirror, token in zip(ready, sampler(logits, ready).token_ids):
                mirror.output_token_ids.append(token)
            if len(ready[0].output_token_ids) == k:
                break
            logits = runner.run(ready, False)
        for mirror in ready:  # K/V are computed up to the last proposal (not included)
            mirror.num_scheduled_tokens = 0
        return {mirror.seq_id: list(mirror.output_token_ids) for mirror in ready}

    def forget(self, seq: Sequence) -> None:
        mirror = self.mirrors.pop(seq.seq_id, None)
        if mirror is not None:
            self.engine.block_manager.free(mirror)

    def _drop_finished(self) -> None:
        """Free the mirrors of sequences that finished or were aborted or preempted since the last step."""
        live = {seq.seq_id for request in self.target.requests.values() for seq in request.seqs
                if not seq.is_finished and seq.block_table}
        for seq_id in [s for s in self.mirrors if s not in live]:
            self.engine.block_manager.free(self.mirrors.pop(seq_id))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _check_vocabulary(draft, target) -> None:
    """The draft's token ids must mean the target's tokens."""
    if draft.vocab_size != target.vocab_size or any(
            draft.id_to_token(i) != target.id_to_token(i) for i in range(0, target.vocab_size, 97)):
        raise ValueError(f"speculative_config.model: the draft's vocabulary ({draft.vocab_size} tokens) is not the "
                         f"target's ({target.vocab_size}); a draft must share the target's tokenizer")
