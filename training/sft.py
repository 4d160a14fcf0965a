"""Stage `sft`: supervised fine-tuning on conversations (JSONL {"messages": [...]}) rendered with the model's chat
template; the loss covers only the assistant turns. Starts from any checkpoint the server loads: our pretrained
directory, a Hugging Face directory, or "default" (SmolLM2-135M-Instruct's GGUF)."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.loading import load_model
from training.checkpoint import check_vocab, save_pretrained
from training.data import encode_conversation, read_conversations, shuffled_index
from training.pretrain import causal_lm_loss
from training.trainer import TrainSettings, distributed, train


@dataclass
class SFTSettings(TrainSettings):
    model: str = "out/pretrain"  # the checkpoint to start from (a directory, a .gguf file or "default")
    data: list[str] = field(default_factory=list)  # JSONL conversations
    val_data: list[str] = field(default_factory=list)  # held-out conversations (assistant-token loss)
    out_dir: str = "out/sft"
    max_len: int = 512
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_batches: int = 16


def encode_all(tokenizer, conversations, max_len: int) -> list[tuple[list[int], list[int]]]:
    encoded = []
    for where, messages in conversations:
        ids, labels = encode_conversation(tokenizer, messages, max_len)
        if all(label == -100 for label in labels[1:]):
            raise ValueError(f"{where}: no assistant token is left within max_len ({max_len}) tokens")
        encoded.append((ids, labels))
    return encoded


def padded(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [B, T - 1], right-padded; padding and non-assistant targets are -100."""
    width = max(len(ids) for ids, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        inputs[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return inputs[:, :-1], labels[:, 1:]


def assistant_loss(logits_of, rows, pad_id: int, batch_size: int, batches: int | None = None) -> float:
    """Mean loss per assistant token over `rows` (held-out evaluation)."""
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(rows), batch_size)):
        if batches is not None and n >= batches:
            break
        x, y = padded(rows[start:start + batch_size], pad_id)
        tokens = int((y != -100).sum())
        total += causal_lm_loss(logits_of, x, y).item() * tokens
        count += tokens
    return total / max(count, 1)


def sft(s: SFTSettings) -> Path:
    distributed()
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    loaded = load_model(s.model, "float32", "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    check_vocab(tokenizer, loaded.config.vocab_size, s.model)
    if not s.data:
        raise ValueError("setting data: give the JSONL conversations to train on")
    rows = encode_all(tokenizer, read_conversations(s.data), s.max_len)
    val = encode_all(tokenizer, read_conversations(s.val_data), s.max_len) if s.val_data else []
    pad = tokenizer.eos_token_id or 0
    order: dict = {}

    def micro_loss(forward, first: int, size: int) -> torch.Tensor:
        batch = [rows[shuffled_index(first + i, len(rows), s.seed, order)] for i in range(size)]
        return causal_lm_loss(forward, *padded(batch, pad))

    def evaluate() -> dict:
        if not val:
            return {}
        loss = assistant_loss(model.causal_logits, val, pad, s.batch_size, s.eval_batches)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    header = {"stage": "sft", "base": s.model, "conversations": len(rows), "val_conversations": len(val)}
    for p in model.parameters():
        p.requires_grad_(True)
    source = loaded.path if loaded.path.is_dir() else tokenizer  # a GGUF's tokenizer is written out from ours
    train(s, model, model.causal_logits, micro_loss, evaluate, lambda out: save_pretrained(model, source, out),
          header)
    return Path(s.out_dir)
