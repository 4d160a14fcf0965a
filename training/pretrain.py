"""Stage `pretrain`: a small Llama-shaped decoder from scratch on a text corpus.

Packed sequences, AdamW, linear warmup then cosine decay, gradient accumulation and clipping, bf16 autocast where
the hardware has fast bf16, periodic validation loss and perplexity (next to a unigram baseline), exact resume
(weights, optimizer, step, RNG; the data order is a function of the step), and DDP under torchrun (gloo on CPU):
step s always trains on samples [s * G, (s + 1) * G) of the shuffled stream, G the global batch, whatever the
number of processes. Writes a Hugging Face-layout checkpoint in out_dir and a log.jsonl of every step."""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.loading import _cpu_has_fast_bf16
from models.tokenizer import Tokenizer
from training.checkpoint import load_train_state, save_pretrained, save_train_state
from training.data import PackedSamples, read_documents, token_stream


@dataclass
class PretrainSettings:
    data: list[str] = field(default_factory=list)  # text / JSONL files or glob patterns
    tokenizer: str = "out/tokenizer"  # a tokenizer directory (the `tokenizer` stage's out_dir)
    out_dir: str = "out/pretrain"
    # model shape
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    seq_len: int = 128
    # optimisation
    batch_size: int = 8  # sequences per micro-batch and process
    grad_accum: int = 1  # micro-batches per step and process
    max_steps: int = 200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    val_fraction: float = 0.05
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    resume: bool = False  # continue from out_dir's train_state.pt
    stop_at: int = 0  # end this run after that step (a planned interruption; the schedule still spans max_steps)
    seed: int = 1337
    threads: int = 0  # torch threads per process; 0 = torch's default
    progress: bool = True


def lr_at(step: int, s: PretrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


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


class CausalLM(torch.nn.Module):
    """The model as DDP wants it: a module whose forward maps [B, T] token ids to [B, T, vocab] logits."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.causal_logits(input_ids)


def causal_lm_loss(logits_of, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits_of(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, samples: PackedSamples, batch_size: int, batches: int) -> float:
    model.eval()
    losses = [causal_lm_loss(model.causal_logits, x, y).item() for x, y in samples.in_order(batch_size, batches)]
    model.train()
    return sum(losses) / len(losses)


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of the validation tokens under the training unigram distribution (add-one smoothed)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    return float(-(counts / counts.sum()).log()[val].mean())


def pretrain(s: PretrainSettings) -> Path:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    out = Path(s.out_dir)
    tokenizer = Tokenizer.from_dir(s.tokenizer)
    tokens = token_stream(read_documents(s.data), tokenizer, tokenizer.bos_token_id)
    n_val = max(s.seq_len + 1, int(len(tokens) * s.val_fraction))
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    train, val = PackedSamples(train_tokens, s.seq_len, s.seed), PackedSamples(val_tokens, s.seq_len, s.seed)
    model = build_model(s, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(s.beta1, s.beta2))
    step = 0
    if s.resume and (out / "train_state.pt").is_file():
        model.load_state_dict(load_file(out / "train_weights.safetensors"))
        state = load_train_state(out)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    ddp = torch.nn.parallel.DistributedDataParallel(CausalLM(model)) if world > 1 else model.causal_logits
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if _cpu_has_fast_bf16() else nullcontext()
    global_batch = s.batch_size * s.grad_accum * world
    baseline = unigram_loss(train_tokens, val_tokens, tokenizer.vocab_size)
    log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "log.jsonl", "a")
        log.write(json.dumps({"settings": asdict(s), "world_size": world, "train_tokens": len(train_tokens),
                              "val_tokens": len(val_tokens), "unigram_val_loss": baseline,
                              "unigram_val_ppl": math.exp(baseline)}) + "\n")
    bar = tqdm(total=s.max_steps, initial=step, desc="pretrain", disable=rank != 0 or not s.progress)
    model.train()
    end = min(s.max_steps, s.stop_at) if s.stop_at else s.max_steps
    while step < end:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        total = torch.zeros(())
        for micro in range(s.grad_accum):
            first = step * global_batch + (micro * world + rank) * s.batch_size
            x, y = train.batch(first, s.batch_size)
            sync = ddp.no_sync() if world > 1 and micro < s.grad_accum - 1 else nullcontext()
            with sync, autocast:
                loss = causal_lm_loss(ddp, x, y) / s.grad_accum
            loss.backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": total.item(), "lr": lr_at(step - 1, s), "grad_norm": float(norm),
                  "tok_s": global_batch * s.seq_len / (time.perf_counter() - start)}
        if step % s.eval_every == 0 or step == s.max_steps:
            record["val_loss"] = evaluate(model, val, s.batch_size, s.eval_batches)
            record["val_ppl"] = math.exp(record["val_loss"])
        if rank == 0:
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_s']:.0f}", refresh=False)
            bar.update(1)
            if step % s.save_every == 0 or step == end:
                _save(model, optimizer, step, s, out)
    bar.close()
    if world > 1:
        dist.barrier()
    return out


def _save(model: LlamaForCausalLM, optimizer, step: int, s: PretrainSettings, out: Path) -> None:
    save_pretrained(model, s.tokenizer, out)
    # exact weights for resuming under our own names (the HF file splits fused projections, a lossless copy too,
    # but this keeps resume independent of the export format)
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(out / "train_weights.safetensors"))
    save_train_state(out, optimizer, step)
