"""Stage `pretrain`: a small Llama-shaped decoder from scratch on a text corpus: documents tokenized into one
stream (each opened by BOS), cut into packed samples, next-token cross-entropy; validation loss and perplexity
next to a unigram baseline. The loop (schedule, accumulation, DDP, resume) is training/trainer.py."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.tokenizer import Tokenizer
from training.checkpoint import save_pretrained
from training.data import PackedSamples, read_documents, token_stream
from training.trainer import TrainSettings, lr_at, start_process, train

__all__ = ["PretrainSettings", "pretrain", "lr_at", "causal_lm_loss"]


@dataclass
class PretrainSettings(TrainSettings):
    data: list[str] = field(default_factory=list)  # text / JSONL files or glob patterns
    tokenizer: str = "out/tokenizer"  # a tokenizer directory (the `tokenizer` stage's out_dir)
    out_dir: str = "out/pretrain"
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    seq_len: int = 128
    val_data: list[str] = field(default_factory=list)  # held-out files; default: the last val_fraction of data
    val_fraction: float = 0.05
    eval_batches: int = 8


def init_weights(model: LlamaForCausalLM, num_layers: int) -> None:
    """GPT-2's init: N(0, 0.02), the projections into the residual stream scaled down by sqrt(2 * layers)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
        else:
            torch.nn.init.zeros_(p)


def build_model(s: PretrainSettings, tokenizer: Tokenizer) -> LlamaForCausalLM:
    eos = [i for i in (tokenizer.eos_token_id, tokenizer.token_to_id("</s>")) if i is not None]
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=tokenizer.vocab_size, hidden_size=s.hidden_size,
                      intermediate_size=s.intermediate_size, num_layers=s.num_layers, num_heads=s.num_heads,
                      num_kv_heads=s.num_kv_heads, head_dim=s.hidden_size // s.num_heads, rms_norm_eps=1e-5,
                      max_position_embeddings=max(2048, s.seq_len), tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_ids=list(dict.fromkeys(eos)))
    model = LlamaForCausalLM(cfg)
    init_weights(model, s.num_layers)
    return model


def causal_lm_loss(logits_of, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits_of(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of the validation tokens under the training unigram distribution (add-one smoothed)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    return float(-(counts / counts.sum()).log()[val].mean())


def pretrain(s: PretrainSettings, batch_loss=causal_lm_loss, stage: str = "pretrain") -> Path:
    """Train from scratch; `batch_loss(forward, inputs, targets)` is next-token cross-entropy unless a stage
    (distill) brings its own."""
    world = start_process(s)
    tokenizer = Tokenizer.from_dir(s.tokenizer)
    tokens = token_stream(read_documents(s.data), tokenizer, tokenizer.bos_token_id)
    if s.val_data:
        train_tokens = tokens
        val_tokens = token_stream(read_documents(s.val_data), tokenizer, tokenizer.bos_token_id)
    else:
        n_val = max(s.seq_len + 1, int(len(tokens) * s.val_fraction))
        train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    samples, val = PackedSamples(train_tokens, s.seq_len, s.seed), PackedSamples(val_tokens, s.seq_len, s.seed)
    model = build_model(s, tokenizer)
    baseline = unigram_loss(train_tokens, val_tokens, tokenizer.vocab_size)

    def micro_loss(forward, first: int, size: int) -> torch.Tensor:
        return batch_loss(forward, *samples.batch(first, size))

    def evaluate() -> dict:
        losses = [causal_lm_loss(model.causal_logits, x, y).item() for x, y in val.in_order(s.batch_size,
                                                                                             s.eval_batches)]
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    header = {"stage": stage, "train_tokens": len(train_tokens), "val_tokens": len(val_tokens),
              "unigram_val_loss": baseline, "unigram_val_ppl": math.exp(baseline),
              "tokens_per_step": s.batch_size * s.grad_accum * s.seq_len * world}
    train(s, model, model.causal_logits, micro_loss, evaluate, lambda out: save_pretrained(model, s.tokenizer, out),
          header)
    return Path(s.out_dir)
