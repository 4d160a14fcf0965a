"""Speculative decoding: propose a few next tokens cheaply, have the target model check them all in one forward,
keep the ones it would have produced itself.

The check never changes what a request gets. At each proposed position the target's own token is drawn exactly as
a decode step would draw it (the same sampler, penalties, grammar mask and seeded generator, with the state the
accepted tokens left), and a proposal is kept only while it equals that token. For greedy requests that is the
argmax; for sampled ones it is rejection sampling with a deterministic proposal (accept d with probability p(d),
else draw from p without d), so the output keeps the target's distribution. The verification forward goes through
the prefill path, whose rows on the default (GGUF) path equal the decode step's bit for bit.

Proposers: `ngram` (prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
n tokens) and `draft_model` (engine/draft_model.py). The policy (`SpecPolicy`) turns proposals off where they
would cost: a batch larger than `max_batch`, or a sequence whose recent proposals were mostly rejected.
"""
from dataclasses import dataclass, fields

import numpy as np

from engine.sequence import Sequence

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config keys (and two of ours: max_batch, min_acceptance)."""
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 2  # a one-token match proposes noise (a newline matches anywhere)
    model: str | None = None  # draft_model: a checkpoint with the target's tokenizer
    max_batch: int = 4  # no proposals for a decode batch of more sequences (the check then costs more than it saves)
    min_acceptance: float = 0.3  # a sequence whose proposals are accepted less often gets none for a while

    @classmethod
    def from_dict(cls, raw: dict) -> "SpeculativeConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name in ("method", "num_speculative_tokens"):
            if name not in raw:
                raise ValueError(f"speculative_config.{name} is required")
        return cls(**raw)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must not exceed prompt_lookup_max")
        if not 0 <= self.min_acceptance <= 1:
            raise ValueError(f"speculative_config.min_acceptance must be in [0, 1], got {self.min_acceptance!r}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative_config.model names the draft checkpoint: required for draft_model, "
                             "and only for it")


def ngram_proposal(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
    if len(tokens) < n_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, len(arr) - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every earlier n-gram (not the suffix)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return arr[start:start + k].tolist()
    return []


@dataclass
class _Track:
    proposed: float = 0.0
    accepted: float = 0.0
    cooldown: int = 0  # steps without proposals left
    per_step: float = 2.0  # decayed mean of proposals accepted per step: the next proposal's length follows it


class SpecPolicy:
    """Per sequence: an exponentially decayed acceptance rate; below min_acceptance, no proposals for a while."""

    def __init__(self, config: SpeculativeConfig, decay: float = 0.8, cooldown: int = 16):
        self.config, self.decay, self.cooldown = config, decay, cooldown
        self.tracks: dict[int, _Track] = {}

    def length(self, seq: Sequence) -> int:
        """How many tokens to propose for the sequence now (0: none). A verified position costs about what a decode
        row does, so a proposal is only as long as recent ones were accepted, plus two."""
        track = self.tracks.setdefault(seq.seq_id, _Track())
        if track.cooldown > 0:
            track.cooldown -= 1
            return 0
        return min(self.config.num_speculative_tokens, int(track.per_step) + 2)

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        track = self.tracks.setdefault(seq.seq_id, _Track())
        track.proposed = track.proposed * self.decay + proposed
        track.accepted = track.accepted * self.decay + accepted
        track.per_step = track.per_step * self.decay + accepted * (1 - self.decay)
        if track.proposed >= 2 and track.accepted < self.config.min_acceptance * track.proposed:
            track.cooldown, track.proposed, track.accepted = self.cooldown, 0.0, 0.0

    def forget(self, seq: Sequence) -> None:
        self.tracks.pop(seq.seq_id, None)


class Speculator:
    """The engine's speculative decode step: propose, verify in one forward, accept, give back unused KV slots."""

    def __init__(self, engine, config: SpeculativeConfig, draft=None):
        self.engine, self.config, self.draft = engine, config, draft
        self.policy = SpecPolicy(config)
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0

    def forget(self, seq: Sequence) -> None:
        """The sequence is done (finished or aborted): drop its record and its draft cache."""
        self.policy.forget(seq)
        if self.draft is not None:
            self.draft.forget(seq)

    def _proposals(self, seqs: list[Sequence]) -> dict[int, list[int]]:
        cfg, bm, found = self.config, self.engine.block_manager, {}
        if len(seqs) > cfg.max_batch:
            return found
        lengths = {seq.seq_id: self.policy.length(seq) for seq in seqs}
        wanted = [seq for seq in seqs if lengths[seq.seq_id]]
        if self.draft is not None:
            proposals = self.draft.propose(wanted, cfg.num_speculative_tokens) if wanted else {}
        else:
            proposals = {seq.seq_id: ngram_proposal(seq.all_token_ids, cfg.num_speculative_tokens,
                                                    cfg.prompt_lookup_max, cfg.prompt_lookup_min) for seq in wanted}
        for seq in wanted:
            draft = (proposals.get(seq.seq_id) or [])[:lengths[seq.seq_id]]
            if seq.params.max_tokens is not None:  # no proposal past the request's last token
                draft = draft[:max(seq.params.max_tokens - len(seq.output_token_ids) - 1, 0)]
            draft = draft[:max(self.engine.max_model_len - seq.num_tokens - 1, 0)]
            if draft and bm.reserve(seq, seq.num_tokens + len(draft)):
                found[seq.seq_id] = draft
        return found

    def step(self, seqs: list[Sequence], touched: dict) -> bool:
        """Run the decode step of `seqs` speculatively; False (nothing done) when nothing is proposed."""
        drafts = self._proposals(seqs)
        if not drafts:
            return False
        engine = self.engine
        for seq in seqs:  # the proposals join the sequence for the forward: its last token and them
            draft = drafts.get(seq.seq_id, [])
            seq.output_token_ids.extend(draft)
            seq.num_scheduled_tokens = 1 + len(draft)
        try:
            logits = engine.runner.verify(seqs)
        finally:
            for seq in seqs:
                if drafts.get(seq.seq_id):
                    del seq.output_token_ids[-len(drafts[seq.seq_id]):]
        offsets, row = {}, 0
        for seq in seqs:
            offsets[seq.seq_id], row = row, row + seq.num_scheduled_tokens
        accepted = {seq.seq_id: 0 for seq in seqs}
        active = list(seqs)
        for i in range(1 + max(len(d) for d in drafts.values())):
            if not active:
                break
            sampled = engine.sampler(logits[[offsets[s.seq_id] + i for s in active]], active)
            still = []
            for seq, token, logprobs in zip(active, sampled.token_ids, sampled.logprobs):
                request = engine.requests[seq.request_id]
                touched[request.request_id] = request
                try:
                    engine._advance(request, seq, token, logprobs)
                except Exception as e:
                    engine._fail(request, e, touched)
                    continue
                draft = drafts.get(seq.seq_id, [])
                if i < len(draft) and token == draft[i] and not seq.is_finished:
                    accepted[seq.seq_id] += 1
                    still.append(seq)
            active = still
        for seq in seqs:
            draft = drafts.get(seq.seq_id, [])
            if draft:
                self.num_drafts += 1
                self.num_draft_tokens += len(draft)
                self.num_accepted_tokens += accepted[seq.seq_id]
                self.policy.record(seq, len(draft), accepted[seq.seq_id])
            if seq.is_finished:
                continue
            # K/V now hold the last token and the accepted proposals; the rejected ones' slots go back
            seq.num_scheduled_tokens = 1 + accepted[seq.seq_id]
            engine.scheduler.commit([seq])
            engine.block_manager.trim(seq)
        return True
