"""Stage `dpo`: direct preference optimisation on JSONL pairs {"prompt": [messages] or "text", "chosen": "...",
"rejected": "..."}. The policy starts from `model` (usually the SFT checkpoint), the reference is a frozen copy of
it; loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))),
log-probabilities summed over the answer's tokens. With nll_weight > 0 the chosen answers' mean token
negative log-likelihood is added (RPO, TRL's rpo_alpha): it keeps the policy generating the chosen answers while
the DPO term only widens the gap, which alone can lower both likelihoods. Reports held-out preference accuracy and
reward margin."""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.data import encode_conversation, expand, SampleOrder, read_jsonl
from training.sft import FinetuneSettings, padded, saver, start_model
from training.trainer import train


@dataclass
class DPOSettings(FinetuneSettings):
    out_dir: str = "out/dpo"
    beta: float = 0.1
    nll_weight: float = 0.0
    lr: float = 5e-5
    min_lr: float = 5e-6


def read_prompt(row: dict, where: str) -> list[dict]:
    """A record's "prompt": a string (one user turn) or a list of messages; anything else names file:line."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        raise ValueError(f"{where}: \"prompt\" must be a string or a list of messages")
    return prompt


def read_pairs(patterns: list[str]) -> list[tuple[str, list[dict], str, str]]:
    pairs = []
    for path in expand(patterns):
        for number, row in read_jsonl(path):
            where = f"{path}:{number}"
            prompt = read_prompt(row, where)
            if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
                raise ValueError(f"{where}: a preference pair needs string fields \"chosen\" and \"rejected\"")
            if row["chosen"] == row["rejected"]:
                raise ValueError(f"{where}: chosen and rejected are the same answer")
            pairs.append((where, prompt, row["chosen"], row["rejected"]))
    return pairs


def encode_pairs(tokenizer, pairs, max_len: int) -> list[tuple[tuple, tuple]]:
    out = []
    for where, prompt, chosen, rejected in pairs:
        encoded = tuple(encode_conversation(tokenizer, prompt + [{"role": "assistant", "content": answer}], max_len)
                        for answer in (chosen, rejected))
        if any(all(label == -100 for label in labels[1:]) for _, labels in encoded):
            raise ValueError(f"{where}: an answer falls outside max_len ({max_len}) tokens")
        out.append(encoded)
    return out


def token_logprobs(logits_of, rows, pad_id: int, entropy: bool = False):
    """Per answer token of each row, one forward for all rows: log-probabilities [B, T-1], the mask of answer
    tokens, and (with entropy=True) the distribution's entropy there."""
    x, y = padded(rows, pad_id)
    logprobs = F.log_softmax(logits_of(x).float(), dim=-1)
    picked = logprobs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logprobs.exp() * logprobs).sum(-1).detach() if entropy else None
    return picked, y != -100, ent


def answer_logprobs(logits_of, rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities of each row's answer tokens, their count), one forward for all rows."""
    picked, mask, _ = token_logprobs(logits_of, rows, pad_id)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo(s: DPOSettings) -> Path:
    loaded, facts = start_model(s, "preference pairs")
    policy, tokenizer = loaded.model, loaded.tokenizer
    # with LoRA the frozen copy keeps its zero adapters: it is the starting model exactly
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    pairs = encode_pairs(tokenizer, read_pairs(s.data), s.max_len)
    val = encode_pairs(tokenizer, read_pairs(s.val_data), s.max_len) if s.val_data else []
    pad = tokenizer.eos_token_id or 0
    order = SampleOrder(len(pairs), s.seed)

    def logprobs(logits_of, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi, log ref, answer tokens) [2 * len(batch)]: chosen answers first, then rejected, in one forward
        each."""
        rows = [c for c, _ in batch] + [r for _, r in batch]
        with torch.no_grad():
            ref, _ = answer_logprobs(reference.causal_logits, rows, pad)
        policy_lp, count = answer_logprobs(logits_of, rows, pad)
        return policy_lp, ref, count

    def margins(policy_lp: torch.Tensor, ref_lp: torch.Tensor) -> torch.Tensor:
        reward = s.beta * (policy_lp - ref_lp)
        half = len(reward) // 2
        return reward[:half] - reward[half:]

    def micro_loss(forward, first: int, size: int) -> torch.Tensor:
        batch = [pairs[order(first + i)] for i in range(size)]
        policy_lp, ref_lp, count = logprobs(forward, batch)
        loss = -F.logsigmoid(margins(policy_lp, ref_lp)).mean()
        if s.nll_weight:
            loss = loss + s.nll_weight * (-policy_lp[:size] / count[:size]).mean()
        return loss

    def evaluate() -> dict:
        if not val:
            return {}
        margin, prefers = [], []
        for i in range(0, len(val), s.batch_size):
            policy_lp, ref_lp, _ = logprobs(policy.causal_logits, val[i:i + s.batch_size])
            margin.append(margins(policy_lp, ref_lp))
            half = len(policy_lp) // 2
            prefers.append(policy_lp[:half] > policy_lp[half:])
        margin, prefers = torch.cat(margin), torch.cat(prefers)
        # reward accuracy is 0 for the starting model (its rewards are all 0); "prefers_chosen" is the model's
        # own preference (log pi(chosen) > log pi(rejected)), comparable before and after training
        return {"val_loss": float(-F.logsigmoid(margin).mean()), "val_reward_accuracy": float(
            (margin > 0).float().mean()), "val_margin": float(margin.mean()),
                "val_prefers_chosen": float(prefers.float().mean())}

    header = {"stage": "dpo", **facts, "beta": s.beta, "nll_weight": s.nll_weight, "pairs": len(pairs),
              "val_pairs": len(val)}
    train(s, policy, policy.causal_logits, micro_loss, evaluate, saver(s, loaded), header)
    return Path(s.out_dir)
