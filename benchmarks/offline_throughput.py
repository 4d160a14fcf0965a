"""Offline throughput: tokenmill's continuous batching vs transformers' static batching, in one run.

Same model, dtype and thread count; 64 requests with mixed prompt and output lengths (EOS ignored so both
systems produce exactly the requested number of tokens). transformers runs the requests in arrival order in
fixed batches: left-padded prompts, and every batch decodes until its longest request is done.

    .venv/bin/python benchmarks/offline_throughput.py [--model default] [--dtype auto] [--num-requests 64]
    .venv/bin/python benchmarks/offline_throughput.py --sweep 1,8,32   # batch limits; plots tok/s against them

With --sweep, each value caps tokenmill's running sequences (max_num_seqs) and sets transformers' batch size.
"""
import argparse
import datetime
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from models.loading import load_tokenizer, resolve_dtype, resolve_model_path  # noqa: E402

def workload(tokenizer, n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int):
    """(prompt token ids, output length) pairs: seeded random lengths, and prompts of seeded random ordinary
    tokens (no special ones). With EOS ignored, speed does not depend on what the tokens say, and random prompts
    share no prefix by accident; the same seed gives the same workload on every commit."""
    rng = random.Random(seed)
    first, vocab = 256, tokenizer.vocab_size  # the first ids of byte-level vocabularies are bytes and specials
    requests = []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        requests.append(([rng.randrange(first, vocab) for _ in range(length)], rng.randint(*output_range)))
    return requests


def run_tokenmill(args, requests) -> tuple[float, int]:
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, quantization=args.quantization)
    llm.generate([requests[0][0]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=out, ignore_eos=True) for _, out in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_transformers(args, requests) -> tuple[float, int]:
    import transformers
    path = resolve_model_path(args.model)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    pad = 0
    generated = 0
    with torch.inference_mode():
        model.generate(torch.tensor([requests[0][0]]), max_new_tokens=4, do_sample=False, pad_token_id=pad)
        start = time.perf_counter()
        for i in range(0, len(requests), args.hf_batch_size):
            batch = requests[i:i + args.hf_batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
            new = max(out for _, out in batch)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
            assert out.shape[1] == width + new
            generated += sum(o for _, o in batch)  # useful tokens: what each request asked for
        elapsed = time.perf_counter() - start
    return elapsed, generated


def plot_sweep(points: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, values in points.items():
        ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch limit (sequences)")
    ax.set_ylabel("output tokens/s")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 192))
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", help="comma-separated batch limits (tokenmill max_num_seqs = transformers "
                                        "batch size), e.g. 1,8,32; writes a PNG next to --out")
    parser.add_argument("--quantization", default="", help="comma-separated CPU quantizations to run tokenmill "
                                                            "with as well, e.g. int4,int8 (models/quantize.py)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    requests = workload(load_tokenizer(args.model), args.num_requests, args.prompt_len, args.output_len, args.seed)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))

    limits = [int(v) for v in args.sweep.split(",")] if args.sweep else [None]
    variants = [("tokenmill", None)] + [(f"tokenmill {q}", q) for q in args.quantization.split(",") if q]
    rows, points = [], {name: [] for name, _ in variants} | {"transformers": []}
    ratios: dict[str, list[str]] = {name: [] for name, _ in variants}
    for limit in limits:
        args.max_num_seqs = limit or 256
        if limit:
            args.hf_batch_size = limit
        rates = {}
        runs = [(system, f"{system} (continuous batching, {args.max_num_seqs} seqs)", run_tokenmill, q)
                for system, q in variants]
        runs.append(("transformers", f"transformers (static batches of {args.hf_batch_size})", run_transformers, None))
        for system, name, fn, quantization in runs:
            args.quantization = quantization
            elapsed, tokens = fn(args, requests)
            rows.append((name, tokens, elapsed, tokens / elapsed))
            points[system].append((limit, tokens / elapsed))
            rates[system] = tokens / elapsed
            print(f"{name}: {tokens} output tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tok/s", flush=True)
        for system, _ in variants:
            ratios[system].append(f"{rates[system] / rates['transformers']:.2f}x" + (f" at {limit}" if limit else ""))
    ratio_text = "; ".join(f"{system} / transformers = {', '.join(r)}" for system, r in ratios.items())

    prompt_tokens = sum(len(p) for p, _ in requests)
    lines = [
        "# Offline throughput on CPU",
        "",
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · {args.threads} threads · "
        f"torch {torch.__version__} · model `{args.model}` · dtype {str(dtype).removeprefix('torch.')}",
        "",
        f"{args.num_requests} requests, prompts {args.prompt_len[0]}–{args.prompt_len[1]} tokens "
        f"({prompt_tokens} in all), outputs {args.output_len[0]}–{args.output_len[1]} tokens, EOS ignored, greedy.",
        "",
        "| system | output tokens | time (s) | output tok/s |",
        "|---|---|---|---|",
        *[f"| {n} | {t} | {e:.1f} | {r:.1f} |" for n, t, e, r in rows],
        "",
        f"**{ratio_text}**",
        "",
        "Command: `.venv/bin/python benchmarks/offline_throughput.py " + " ".join(sys.argv[1:]) + "`",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        png = Path(args.out).with_suffix(".png")
        plot_sweep(points, png)
        lines[-2:-2] = [f"![tok/s vs batch limit]({png.name})", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
