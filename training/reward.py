"""Stage `reward`: a reward model trained on preference pairs in the DPO format ({"prompt", "chosen", "rejected"})
with the Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected)). The decoder starts from `model` (usually the
SFT checkpoint) with a fresh scalar head read at the last token (models/reward.py); with lora_rank > 0 the decoder
trains through LoRA adapters and the head in full. Written as transformers' `*ForSequenceClassification` with
num_labels 1, merged. Reports held-out pairwise accuracy (chance: 0.5) and mean margin."""
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.reward import RewardModel, pad_token_id, right_padded
from training.checkpoint import save_reward_model
from training.data import SampleOrder
from training.dpo import encode_pairs, read_pairs
from training.lora import merge_lora, save_adapter
from training.sft import FinetuneSettings, start_model
from training.trainer import train


@dataclass
class RewardSettings(FinetuneSettings):
    out_dir: str = "out/reward"
    lr: float = 5e-5
    min_lr: float = 5e-6


def reward(s: RewardSettings) -> Path:
    if s.lora_rank and not s.merge_lora:
        raise ValueError("setting merge_lora: a reward model is written merged (its head is no LoRA adapter)")
    loaded, facts = start_model(s, "preference pairs")
    tokenizer = loaded.tokenizer
    pad = pad_token_id(tokenizer)
    model = RewardModel(loaded.model, pad)
    model.score.requires_grad_(True)
    # a pair's two sequences: prompt + answer rendered with the chat template, as the policy will answer
    pairs = [(c, r) for (c, _), (r, _) in encode_pairs(tokenizer, read_pairs(s.data), s.max_len)]
    val = [(c, r) for (c, _), (r, _) in encode_pairs(tokenizer, read_pairs(s.val_data), s.max_len)] \
        if s.val_data else []
    order = SampleOrder(len(pairs), s.seed)

    def margins(forward, batch) -> torch.Tensor:
        scores = forward(right_padded([c for c, _ in batch] + [r for _, r in batch], pad))
        return scores[:len(batch)] - scores[len(batch):]

    def micro_loss(forward, first: int, size: int):
        margin = margins(forward, [pairs[order(first + i)] for i in range(size)])
        return -F.logsigmoid(margin).mean(), {"accuracy": (margin > 0).float().mean(),
                                              "margin": margin.detach().mean()}

    def evaluate() -> dict:
        if not val:
            return {}
        margin = torch.cat([margins(model, val[i:i + s.batch_size]) for i in range(0, len(val), s.batch_size)])
        return {"val_loss": float(-F.logsigmoid(margin).mean()), "val_accuracy": float((margin > 0).float().mean()),
                "val_margin": float(margin.mean())}

    source = loaded.path if loaded.path.is_dir() else tokenizer

    def save(out: Path) -> None:
        written = model
        if s.lora_rank:
            save_adapter(model.decoder, out, s.lora_rank, s.lora_alpha, s.lora_targets, s.model)
            written = copy.deepcopy(model)  # merged; training goes on with the adapters separate
            merge_lora(written.decoder)
        save_reward_model(written, source, out)

    header = {"stage": "reward", **facts, "pairs": len(pairs), "val_pairs": len(val), "pad_token_id": pad}
    train(s, model, model, micro_loss, evaluate, save, header)
    return Path(s.out_dir)
