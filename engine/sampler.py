"""Turns a batch of next-token logits (one row per sequence) into sampled token ids.

Every request in the batch may carry different sampling parameters; they are gathered into
per-row tensors once per call (O(batch) Python), and every stage that no row asked for is
skipped outright.
"""
import math
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per sequence: None unless params.logprobs is set, else {token id: logprob} for the
    # sampled token plus the top-`logprobs` tokens of the raw (unprocessed) distribution.
    logprobs: list[dict[int, float] | None]


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A [rows, 1] float tensor on `like`'s device, for broadcasting against [rows, vocab]."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _padded_ids(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device)


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] float counts of each token id in each row."""
    # Padding goes to an extra column `vocab` that is dropped, so it never counts as token 0.
    ids = _padded_ids(rows, vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def process_logits(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: set[int]) -> torch.Tensor:
    """Applies logit_bias, min_tokens, repetition, frequency and presence penalties, in that
    order, to `logits` [len(seqs), vocab] in place, and returns it."""
    num_rows, vocab = logits.shape
    device = logits.device
    params = [s.params for s in seqs]

    rows: list[int] = []
    cols: list[int] = []
    bias: list[float] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            for token, b in p.logit_bias.items():
                if token < vocab:  # out-of-vocab ids are rejected at admission (validate_vocab)
                    rows.append(i)
                    cols.append(token)
                    bias.append(b)
    if rows:
        logits[rows, cols] += torch.tensor(bias, dtype=logits.dtype, device=device)

    rows, cols = [], []
    eos = sorted(eos_token_ids)
    for i, s in enumerate(seqs):
        if len(s.output_token_ids) < s.params.min_tokens:
            banned = [t for t in eos + list(s.params.stop_token_ids or []) if t < vocab]
            rows.extend([i] * len(banned))
            cols.extend(banned)
    if rows:
        logits[rows, cols] = -math.inf

    use_rep = [p.repetition_penalty != 1.0 for p in params]
    use_freq_pres = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    if not any(use_rep) and not any(use_freq_pres):
        return logits

    # Only rows that use some penalty contribute history; the others get empty rows.
    out_counts = _token_counts(
        [s.output_token_ids if r or f else [] for s, r, f in zip(seqs, use_rep, use_freq_pres)], vocab, device
    )
    if any(use_rep):
        seen = out_counts > 0
        prompt_ids = _padded_ids([s.prompt_token_ids if r else [] for s, r in zip(seqs, use_rep)], vocab, device)
        prompt_seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=device)
        prompt_seen.scatter_(1, prompt_ids, True)
        seen |= prompt_seen[:, :vocab]
        penalty = _row_tensor([p.repetition_penalty for p in params], logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    if any(use_freq_pres):
        freq = _row_tensor([p.frequency_penalty for p in params], logits)
        pres = _row_tensor([p.presence_penalty for p in params], logits)
        logits -= out_counts * freq + (out_counts > 0).to(logits.dtype) * pres
    return logits


def truncate_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Divides by temperature, then applies top_k, top_p and min_p (tokens removed get -inf).

    For non-greedy rows only (temperature > 0). Modifies `logits` in place when it can and
    returns the result; softmax of it is the distribution each row samples from.
    """
    vocab = logits.shape[1]
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        logits.div_(_row_tensor(temps, logits))

    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]
    use_k = any(k < vocab for k in top_k)
    use_p = any(p != math.inf for p in top_p)
    if use_k and not use_p:
        # topk over the largest k asked for is much cheaper than a full sort of the vocabulary.
        # (Ties with the k-th value are all kept here.)
        k_max = max(k for k in top_k if k < vocab)
        top_values = logits.topk(k_max, dim=-1).values
        ks = torch.tensor([min(k, k_max) - 1 for k in top_k], device=logits.device).unsqueeze(1)
        kth = top_values.gather(1, ks)
        kth.masked_fill_(torch.tensor([k >= vocab for k in top_k], device=logits.device).unsqueeze(1), -math.inf)
        logits.masked_fill_(logits < kth, -math.inf)
    elif use_k or use_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if use_k:
            positions = torch.arange(vocab, device=logits.device)
            ks = torch.tensor(top_k, device=logits.device).unsqueeze(1)
            sorted_logits.masked_fill_(positions >= ks, -math.inf)
        if use_p:
            # Probabilities renormalized after top_k; a token stays while the mass strictly
            # before it is still short of top_p, so the top token always stays.
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            sorted_logits.masked_fill_(mass_before >= _row_tensor(top_p, probs), -math.inf)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)

    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p). Truncation above keeps
        # the top token and renormalizing does not change probability ratios, so this equals
        # applying min_p to the already-truncated distribution.
        log_min_p = _row_tensor([math.log(m) if m > 0 else -math.inf for m in min_p], logits)
        threshold = logits.max(dim=-1, keepdim=True).values + log_min_p
        logits.masked_fill_(logits < threshold, -math.inf)
    return logits


def _exponential_noise(seqs: list[Sequence], like: torch.Tensor) -> torch.Tensor:
    """Exponential(1) noise shaped like `like`; rows with a generator draw from it alone, so
    their samples do not depend on what else shares the batch."""
    seeded = [i for i, s in enumerate(seqs) if s.generator is not None]
    if not seeded:
        return torch.empty_like(like).exponential_()
    vocab = like.shape[1]
    own = torch.stack(
        [torch.empty(vocab, device=seqs[i].generator.device).exponential_(generator=seqs[i].generator) for i in seeded]
    ).to(like.device)
    if len(seeded) == len(seqs):
        return own
    noise = torch.empty_like(like)
    noise[seeded] = own
    unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
    noise[unseeded] = torch.empty(len(unseeded), vocab, device=like.device).exponential_()
    return noise


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    probs = truncate_logits(logits, [s.params for s in seqs]).softmax(dim=-1)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i.
    # The clamp keeps a zero draw from producing 0/0 = NaN, which argmax would select.
    noise = _exponential_noise(seqs, probs).clamp_(min=torch.finfo(probs.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


class Sampler:
    def __init__(self, eos_token_ids: set[int], grammars=None):
        self.eos_token_ids = set(eos_token_ids)
        self.grammars = grammars  # engine.structured_output.Grammars, for requests with structured outputs

    @torch.inference_mode()  # the logits come from the model runner's inference mode and are changed in place
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        if not seqs:
            return SamplerOutput([], [])
        if logits.dtype != torch.float32:
            logits = logits.float()
        params = [s.params for s in seqs]

        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

        if self.grammars is not None and any(s.grammar is not None for s in seqs):
            self.grammars.mask(logits, [s.grammar for s in seqs])
        logits = process_logits(logits, seqs, self.eos_token_ids)

        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        elif not any(greedy):
            tokens = _sample(logits, seqs)
        else:
            g_rows = torch.tensor([i for i, g in enumerate(greedy) if g], device=logits.device)
            s_list = [i for i, g in enumerate(greedy) if not g]
            s_rows = torch.tensor(s_list, device=logits.device)
            tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
            tokens[g_rows] = logits[g_rows].argmax(dim=-1)
            tokens[s_rows] = _sample(logits[s_rows], [seqs[i] for i in s_list])

        token_ids = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            chosen = tokens[want_logprobs].unsqueeze(1)
            chosen_lp = raw_logprobs.gather(1, chosen).squeeze(1).tolist()
            k_max = min(max(params[i].logprobs for i in want_logprobs), raw_logprobs.shape[1])
            top_lp, top_ids = raw_logprobs.topk(k_max, dim=-1)
            top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
            for j, i in enumerate(want_logprobs):
                k = params[i].logprobs
                entry = {token_ids[i]: chosen_lp[j]}
                entry.update(zip(top_ids[j][:k], top_lp[j][:k]))
                logprobs[i] = entry
        return SamplerOutput(token_ids, logprobs)
