"""Where a decode step's time goes: engine stages timed by hand, then torch.profiler's top operators.

    .venv/bin/python benchmarks/profile_step.py [--model default] [--batch 1,32] [--steps 20]

Stages: schedule (scheduler + block tables), model (ModelRunner.run: inputs, forward, logits), sample (Sampler),
rest (detokenize, stop checks, outputs). Writes benchmarks/results/profile_cpu.md.
"""
import argparse
import datetime
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402


def _timed(obj, name: str, totals: dict):
    """Wrap obj.name to add its time to totals[name]; returns the original, to put back."""
    inner = getattr(obj, name)

    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            totals[name] += time.perf_counter() - start
    setattr(obj, name, wrapper)
    return inner


def decode_steps(llm: LLM, batch: int, prompt_len: int, steps: int, top: int) -> list[str]:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps * 3 + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"p{batch}-{i}", [100 + (i + j) % 1000 for j in range(prompt_len)], params)
    while engine.num_waiting:  # prefill everyone, then warm up a few decode steps
        engine.step()
    for _ in range(3):
        engine.step()
    totals: dict[str, float] = defaultdict(float)
    stages = ((engine.scheduler, "schedule"), (engine.runner, "run"), (engine, "sampler"))
    originals = [_timed(obj, name, totals) for obj, name in stages]
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    for (obj, name), original in zip(stages, originals):
        setattr(obj, name, original)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    for i in range(batch):
        engine.abort_request(f"p{batch}-{i}")
    per = {k: v / steps for k, v in totals.items()}
    rest = wall - sum(per.values())
    lines = [f"## Batch {batch}: {wall * 1000:.1f} ms per decode step ({batch / wall:.0f} tok/s)", "",
             "| stage | ms / step | share |", "|---|---|---|"]
    for label, key in (("schedule", "schedule"), ("model (inputs, forward, logits)", "run"), ("sample", "sampler")):
        lines.append(f"| {label} | {per[key] * 1000:.2f} | {per[key] / wall:.0%} |")
    lines += [f"| rest (detokenize, stop checks, outputs) | {rest * 1000:.2f} | {rest / wall:.0%} |", "",
              f"Top operators by self CPU time ({steps} more steps under torch.profiler):", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40),
              "```", ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_cpu.md"))
    args = p.parse_args()
    llm = LLM(args.model, dtype=args.dtype)
    lines = ["# Where a decode step's time goes (CPU)", "",
             f"{datetime.date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
             f"{torch.get_num_threads()} threads · torch {torch.__version__} · model `{args.model}` · "
             f"dtype {args.dtype}", "",
             f"Prompts of {args.prompt_len} tokens, all prefilled first; {args.steps} decode steps timed.", ""]
    for batch in (int(b) for b in args.batch.split(",")):
        lines += decode_steps(llm, batch, args.prompt_len, args.steps, args.top)
        print("\n".join(lines[-12:]), flush=True)
    lines += ["Command: `.venv/bin/python benchmarks/profile_step.py " + " ".join(sys.argv[1:]) + "`", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
