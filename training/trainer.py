"""The one training loop every stage runs: AdamW with linear warmup then cosine decay, gradient accumulation and
clipping, bf16 autocast where the CPU (or a GPU) has fast bf16, DDP under torchrun (gloo on CPU), a log.jsonl of
every step, periodic evaluation and checkpoints, and exact resume.

A step's global batch is samples [step * G, (step + 1) * G) of the stage's sample order (G = batch_size *
grad_accum * processes); process r takes micro-batch (micro * world + r) of it. The data a step sees therefore
depends only on the step: resuming, or splitting over processes, trains on the same samples."""
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.loading import _cpu_has_fast_bf16
from training.checkpoint import load_train_state, save_train_state


@dataclass
class TrainSettings:
    out_dir: str = "out/run"
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
    eval_every: int = 50
    save_every: int = 100
    resume: bool = False  # continue from out_dir's train_state.pt
    stop_at: int = 0  # end this run after that step (a planned interruption; the schedule still spans max_steps)
    seed: int = 1337
    threads: int = 0  # torch threads per process; 0 = torch's default
    progress: bool = True


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))


def distributed() -> tuple[int, int]:
    """(world size, rank), joining the process group when torchrun started several processes."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return world, rank


def start_process(s: TrainSettings) -> int:
    """What every stage does first: join the process group (under torchrun), set threads and the seed. Returns
    the number of processes."""
    world, _ = distributed()
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    return world


class Forward(torch.nn.Module):
    """What DDP wraps: the stage's trainable forward (for the model: token ids -> logits)."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args):
        return self.fn(*args)


def build_optimizer(s: TrainSettings, trainable: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or a scalar head's bias)."""
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(s.beta1, s.beta2))


def resume(s: TrainSettings, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """With s.resume and a saved state in out_dir: the weights, optimizer and RNG states restored; returns the
    step to continue from (0 for a fresh run)."""
    out = Path(s.out_dir)
    if not (s.resume and (out / "train_state.pt").is_file()):
        return 0
    model.load_state_dict(load_file(out / "train_weights.safetensors"))
    state = load_train_state(out)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def save_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """What resume reads: the exact weights under our names, the optimizer and the step."""
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(trained, str(out / "train_weights.safetensors"))
    save_train_state(out, optimizer, step)


def mixed_precision():
    """bf16 autocast where the CPU has fast bf16, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if _cpu_has_fast_bf16() else nullcontext()


def _loss_and_terms(out: torch.Tensor | tuple[torch.Tensor, dict]) -> tuple[torch.Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def train(s: TrainSettings, model: torch.nn.Module, forward: Callable,
          micro_loss: Callable[[Callable, int, int], torch.Tensor | tuple[torch.Tensor, dict]],
          evaluate: Callable[[], dict], save: Callable[[Path], None], header: dict) -> list[dict]:
    """Run steps until max_steps (or stop_at). `forward` is what a loss calls the model through (DDP-wrapped when
    distributed); `micro_loss(forward, first, size)` is the mean loss of samples [first, first + size), or
    (that loss, {name: scalar tensor}) to log more terms of it, averaged over the step like the loss (an MoE's
    aux_loss); `evaluate()` returns metrics to log; `save(out_dir)` writes the stage's checkpoint. Returns the
    step records."""
    world, rank = distributed()
    out = Path(s.out_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(s, trainable)
    step = resume(s, model, optimizer)
    call = torch.nn.parallel.DistributedDataParallel(Forward(model, forward)) if world > 1 else forward
    autocast = mixed_precision()
    global_batch = s.batch_size * s.grad_accum * world
    log = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "log.jsonl", "a" if step else "w")  # a fresh run starts a fresh log
        log.write(json.dumps({"settings": asdict(s), "world_size": world, **header}) + "\n")
    end = min(s.max_steps, s.stop_at) if s.stop_at else s.max_steps
    bar = tqdm(total=end, initial=step, desc=header.get("stage", "train"), disable=rank != 0 or not s.progress)
    records = []
    if step == 0 and rank == 0:  # the starting point, to measure what training changed
        model.eval()
        with torch.no_grad():
            initial = {"step": 0, **evaluate()}
        if len(initial) > 1:
            log.write(json.dumps(initial) + "\n")
            records.append(initial)
    model.train()
    while step < end:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        total = torch.zeros(())
        terms: dict[str, torch.Tensor] = {}
        for micro in range(s.grad_accum):
            first = step * global_batch + (micro * world + rank) * s.batch_size
            sync = call.no_sync() if world > 1 and micro < s.grad_accum - 1 else nullcontext()
            with sync, autocast:
                loss, extra = _loss_and_terms(micro_loss(call, first, s.batch_size))
                loss = loss / s.grad_accum
            loss.backward()
            total += loss.detach()
            for name, value in extra.items():
                terms[name] = terms.get(name, torch.zeros(())) + value.detach().float() / s.grad_accum
        if world > 1:
            dist.all_reduce(total)
            total /= world
            for value in terms.values():
                dist.all_reduce(value)
                value /= world
        norm = torch.nn.utils.clip_grad_norm_(trainable, s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": total.item(), "lr": lr_at(step - 1, s), "grad_norm": float(norm),
                  "seconds": time.perf_counter() - start, **{k: v.item() for k, v in terms.items()}}
        if header.get("tokens_per_step"):
            record["tok_s"] = header["tokens_per_step"] / record["seconds"]
        if rank == 0 and (step % s.eval_every == 0 or step == s.max_steps):
            model.eval()
            with torch.no_grad():
                record.update(evaluate())
            model.train()
        records.append(record)
        if rank == 0:
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", **({"tok_s": f"{record['tok_s']:.0f}"}
                                                             if "tok_s" in record else {}), refresh=False)
            bar.update(1)
            if step % s.save_every == 0 or step == end:
                save(out)
                save_state(out, model, optimizer, step)
    bar.close()
    if world > 1:
        dist.barrier()
    return records
