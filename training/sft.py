"""Stage `sft`: supervised fine-tuning on conversations (JSONL {"messages": [...]}) rendered with the model's chat
template; the loss covers only the assistant turns. Starts from any checkpoint the server loads: our pretrained
directory, a Hugging Face directory, or "default" (SmolLM2-135M-Instruct's GGUF). With lora_rank > 0 only LoRA
adapters train (training/lora.py); they are saved, and merged into the written checkpoint unless merge_lora=false."""
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.loading import LoadedModel, load_model
from training.checkpoint import check_vocab, save_pretrained
from training.data import encode_conversation, read_conversations, SampleOrder
from training.lora import DEFAULT_TARGETS, add_lora, merge_lora, save_adapter
from training.pretrain import causal_lm_loss
from training.trainer import TrainSettings, start_process, train


@dataclass
class FinetuneSettings(TrainSettings):
    """What sft and dpo share: the starting checkpoint, JSONL data, and LoRA."""
    model: str = "out/pretrain"  # the checkpoint to start from (a directory, a .gguf file or "default")
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    max_len: int = 512
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_batches: int = 16
    lora_rank: int = 0  # 0: train every weight
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    merge_lora: bool = True


@dataclass
class SFTSettings(FinetuneSettings):
    out_dir: str = "out/sft"


def start_model(s: FinetuneSettings, data: str) -> tuple[LoadedModel, dict]:
    """A fine-tuning stage's opening: the process set up, its `data` (what the JSONL holds) required, the model
    to fine-tune made trainable (all of it, or LoRA adapters); returns it and facts for the log header."""
    start_process(s)
    if not s.data:
        raise ValueError(f"setting data: give the JSONL {data} to train on")
    loaded = load_model(s.model, "float32", "cpu")
    check_vocab(loaded.tokenizer, loaded.config.vocab_size, s.model)
    total = sum(p.numel() for p in loaded.model.parameters())
    if s.lora_rank:
        trainable = add_lora(loaded.model, s.lora_rank, s.lora_alpha, s.lora_targets)
    else:
        trainable = total
        loaded.model.requires_grad_(True)
    return loaded, {"base": s.model, "parameters": total, "trainable_parameters": trainable,
                    "trainable_fraction": trainable / total}


def saver(s: FinetuneSettings, loaded: LoadedModel) -> Callable[[Path], None]:
    source = loaded.path if loaded.path.is_dir() else loaded.tokenizer  # a GGUF's tokenizer is written from ours

    def save(out: Path) -> None:
        model = loaded.model
        if s.lora_rank:
            save_adapter(model, out, s.lora_rank, s.lora_alpha, s.lora_targets, s.model)
            if not s.merge_lora:
                return
            model = copy.deepcopy(model)  # training goes on with the adapters separate
            merge_lora(model)
        save_pretrained(model, source, out)

    return save


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
    loaded, facts = start_model(s, "conversations")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = encode_all(tokenizer, read_conversations(s.data), s.max_len)
    val = encode_all(tokenizer, read_conversations(s.val_data), s.max_len) if s.val_data else []
    pad = tokenizer.eos_token_id or 0
    order = SampleOrder(len(rows), s.seed)

    def micro_loss(forward, first: int, size: int) -> torch.Tensor:
        batch = [rows[order(first + i)] for i in range(size)]
        return causal_lm_loss(forward, *padded(batch, pad))

    def evaluate() -> dict:
        if not val:
            return {}
        loss = assistant_loss(model.causal_logits, val, pad, s.batch_size, s.eval_batches)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    header = {"stage": "sft", **facts, "conversations": len(rows), "val_conversations": len(val)}
    train(s, model, model.causal_logits, micro_loss, evaluate, saver(s, loaded), header)
    return Path(s.out_dir)
