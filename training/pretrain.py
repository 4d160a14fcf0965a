"""Stage `pretrain`: a small Llama-shaped decoder from scratch on a text corpus: documents tokenized into one
stream (each opened by BOS), cut into packed samples, next-token cross-entropy; validation loss and perplexity
next to a unigram baseline. The loop (schedule, accumulation, DDP, resume) is training/trainer.py.

With num_experts > 0 the model is a Mixture-of-Experts written as MixtralForCausalLM: every MLP is a router over
num_experts SwiGLU experts, each token runs the top num_experts_per_tok of them (weights renormalized to sum to 1,
as Mixtral does), and the loss adds router_aux_loss_coef times transformers' load-balancing loss."""
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.moe import load_balancing_loss
from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.moe import moe_layers
from text.tokenizer import Tokenizer
from training.checkpoint import save_pretrained
from training.data import PackedSamples, read_documents, token_stream
from training.trainer import TrainSettings, lr_at, start_process, train

__all__ = ["PretrainSettings", "pretrain", "lr_at", "causal_lm_loss", "with_aux_loss", "parameter_counts"]


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
    # Mixture-of-Experts: 0 experts is a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # each expert's width; 0: intermediate_size
    router_aux_loss_coef: float = 0.01

    def __post_init__(self):
        check_moe_settings(self)


def check_moe_settings(s: PretrainSettings) -> None:
    """A ValueError naming the expert setting that is out of range, before any data is read."""
    if s.num_experts < 0:
        raise ValueError(f"setting num_experts: must be >= 0 (0: a dense model), got {s.num_experts}")
    if not s.router_aux_loss_coef >= 0:  # NaN too
        raise ValueError(f"setting router_aux_loss_coef: must be >= 0, got {s.router_aux_loss_coef}")
    if s.num_experts and not 1 <= s.num_experts_per_tok <= s.num_experts:
        raise ValueError(f"setting num_experts_per_tok: must be from 1 to num_experts ({s.num_experts}), "
                         f"got {s.num_experts_per_tok}")
    if s.moe_intermediate_size < 0:
        raise ValueError(f"setting moe_intermediate_size: must be >= 0 (0: intermediate_size), "
                         f"got {s.moe_intermediate_size}")


def init_weights(model: LlamaForCausalLM, num_layers: int) -> None:
    """GPT-2's init: N(0, 0.02), the projections into the residual stream (o_proj, down_proj, the experts' stacked
    down projections w2) scaled down by sqrt(2 * layers); routers get N(0, 0.02) like any other matrix."""
    residual = ("o_proj.weight", "down_proj.weight", "experts.w2")
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * num_layers) if name.endswith(residual) else 0.02)
        else:
            torch.nn.init.zeros_(p)


def model_config(s: PretrainSettings, tokenizer: Tokenizer) -> ModelConfig:
    eos = [i for i in (tokenizer.eos_token_id, tokenizer.token_to_id("</s>")) if i is not None]
    arch, width, moe = "LlamaForCausalLM", s.intermediate_size, {}
    if s.num_experts:
        # Mixtral's experts are config.intermediate_size wide (it has no dense MLP): the experts' width is what
        # the written config.json calls intermediate_size
        arch, width = "MixtralForCausalLM", s.moe_intermediate_size or s.intermediate_size
        moe = dict(num_experts=s.num_experts, num_experts_per_tok=s.num_experts_per_tok, moe_intermediate_size=width,
                   norm_topk_prob=True, router_aux_loss_coef=s.router_aux_loss_coef)
    return ModelConfig(architecture=arch, vocab_size=tokenizer.vocab_size, hidden_size=s.hidden_size,
                       intermediate_size=width, num_layers=s.num_layers, num_heads=s.num_heads,
                       num_kv_heads=s.num_kv_heads, head_dim=s.hidden_size // s.num_heads, rms_norm_eps=1e-5,
                       max_position_embeddings=max(2048, s.seq_len), tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_ids=list(dict.fromkeys(eos)), **moe)


def build_model(s: PretrainSettings, tokenizer: Tokenizer) -> LlamaForCausalLM:
    model = LlamaForCausalLM(model_config(s, tokenizer))
    init_weights(model, s.num_layers)
    return model


def parameter_counts(model: LlamaForCausalLM) -> tuple[int, int]:
    """(all parameters, those one token runs through): an MoE layer's token uses num_experts_per_tok of its
    experts. The (tied) embedding counts once in both."""
    total = sum(p.numel() for p in model.parameters())
    idle = sum(p.numel() // p.shape[0] * (p.shape[0] - layer.top_k)
               for layer in moe_layers(model) for p in layer.experts.parameters())
    return total, total - idle


@contextmanager
def collect_router_logits(model: LlamaForCausalLM) -> Iterator[list[torch.Tensor]]:
    """While open, every MoE layer's forward appends its router logits [tokens, num_experts] to the list."""
    layers = moe_layers(model)
    collected: list[torch.Tensor] = []
    for layer in layers:
        layer.router_logits = collected
    try:
        yield collected
    finally:
        for layer in layers:
            layer.router_logits = None


def with_aux_loss(model: LlamaForCausalLM, batch_loss: Callable, coef: float) -> Callable:
    """batch_loss + coef * aux, aux = load_balancing_loss over the router logits of every MoE layer concatenated
    (as transformers' MixtralForCausalLM computes it: one loss over all layers' tokens, not a mean of per-layer
    losses; num_experts_per_tok at perfect balance). Returns (that loss, {"aux_loss": aux}) for the step log."""
    top_k = model.config.num_experts_per_tok

    def loss(forward, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with collect_router_logits(model) as logits:
            main = batch_loss(forward, inputs, targets)
        aux = load_balancing_loss(torch.cat(logits), top_k)
        return main + coef * aux, {"aux_loss": aux}

    return loss


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
    loss_of = with_aux_loss(model, batch_loss, s.router_aux_loss_coef) if s.num_experts else batch_loss

    def micro_loss(forward, first: int, size: int) -> torch.Tensor | tuple[torch.Tensor, dict]:
        return loss_of(forward, *samples.batch(first, size))

    def evaluate() -> dict:  # plain cross-entropy: no aux loss
        losses = [causal_lm_loss(model.causal_logits, x, y).item() for x, y in val.in_order(s.batch_size,
                                                                                             s.eval_batches)]
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(loss)}

    total, active = parameter_counts(model)
    header = {"stage": stage, "architecture": model.config.architecture, "parameters": total,
              "active_parameters": active, "train_tokens": len(train_tokens), "val_tokens": len(val_tokens),
              "unigram_val_loss": baseline, "unigram_val_ppl": math.exp(baseline),
              "tokens_per_step": s.batch_size * s.grad_accum * s.seq_len * world}
    train(s, model, model.causal_logits, micro_loss, evaluate, lambda out: save_pretrained(model, s.tokenizer, out),
          header)
    return Path(s.out_dir)
