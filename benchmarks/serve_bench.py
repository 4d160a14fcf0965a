"""serve_bench: time to first token, inter-token latency and throughput of OpenAI-compatible servers under load.

Benchmark an endpoint that is already running (--base-url), or let serve_bench start each of --systems on the same
model, one after another, and compare them on identical prompts and settings, with ratios against tokenmill
(tokenmill-int4 is tokenmill with --quantization int4):

    .venv/bin/python benchmarks/serve_bench.py --systems tokenmill,transformers --sweep 1,8,32 --name cpu
    .venv/bin/python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000 --model-name default -c 8

Prompts are synthetic (seeded random ordinary tokens, exactly --input-len of them, sent as token ids so every server
sees the same tokens; EOS ignored so each answer is --output-len tokens) or chat prompts from a JSONL file
({"messages": [...], "max_tokens": N} per line). Results go to benchmarks/results/NAME.{md,json,png}.
"""
import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_client import BenchRequest, run_load  # noqa: E402
from benchmarks.machine import cpu_description  # noqa: E402
from benchmarks.bench_stats import Summary, markdown_table, summarize, table_row, TABLE_HEADER  # noqa: E402
from benchmarks.launch import SYSTEMS, LaunchedServer, ServerSpec  # noqa: E402


@dataclass
class Workload:
    requests: list[BenchRequest]
    description: str


@functools.cache
def _tokenizer(model: str):
    """Read once: reading a GGUF's vocabulary takes a second or two, and every point of a sweep needs it."""
    from models.loading import load_tokenizer
    return load_tokenizer(model)


def synthetic(model: str, count: int, input_len: int, output_len: int, seed: int, as_text: bool) -> Workload:
    from benchmarks.offline_throughput import workload
    tokenizer = _tokenizer(model)
    pairs = workload(tokenizer, count, (input_len, input_len), (output_len, output_len), seed)
    requests = [BenchRequest(max_tokens=out, prompt=tokenizer.decode(ids) if as_text else ids,
                             prompt_tokens=len(ids)) for ids, out in pairs]
    return Workload(requests, f"synthetic: {input_len} prompt tokens (seeded random ordinary tokens, no shared "
                              f"prefixes), {output_len} output tokens, EOS ignored, greedy")


def chat_jsonl(path: str, count: int, output_len: int) -> Workload:
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    requests = [BenchRequest(max_tokens=int(lines[i % len(lines)].get("max_tokens", output_len)),
                             messages=lines[i % len(lines)]["messages"]) for i in range(count)]
    return Workload(requests, f"chat prompts from {path} ({len(lines)} distinct), max_tokens {output_len} "
                              "unless a line sets it, EOS ignored, greedy")


def make_workload(args, count: int) -> Workload:
    if args.dataset == "synthetic":
        return synthetic(args.model, count, args.input_len, args.output_len, args.seed, args.text_prompts)
    return chat_jsonl(args.dataset, count, args.output_len)


def num_prompts(args, concurrency: int | None) -> int:
    return args.num_prompts or max(8, 4 * (concurrency or 8))


def bench_endpoint(args, label: str, base_url: str, model_name: str, loads: list[int | None]) -> list[Summary]:
    warmup = make_workload(args, 2).requests
    for r in warmup:
        r.max_tokens = 4
    asyncio.run(run_load(base_url, model_name, warmup, concurrency=2, api_key=args.api_key))
    summaries = []
    for concurrency in loads:
        requests = make_workload(args, num_prompts(args, concurrency)).requests
        records = asyncio.run(run_load(base_url, model_name, requests, concurrency=concurrency,
                                       request_rate=args.request_rate, api_key=args.api_key, seed=args.seed,
                                       ignore_eos=not args.no_ignore_eos))
        summary = summarize(records, label, concurrency, args.request_rate)
        summaries.append(summary)
        print(table_row(summary), flush=True)
        if summary.errors:
            print(f"  {summary.errors} errors; first: {summary.first_error}", flush=True)
    return summaries


def ratio_table(summaries: list[Summary]) -> str:
    """Each tokenmill variant's output tok/s over each baseline's, and the baseline's TTFT p50 over the variant's."""
    ours = [s for s in summaries if s.label.startswith("tokenmill")]
    others = [s for s in summaries if not s.label.startswith("tokenmill")]
    pairs = [(t, s) for s in others for t in ours if t.concurrency == s.concurrency]
    if not pairs:
        return ""
    rows = ["| tokenmill | vs baseline | conc. | output tok/s: tokenmill ÷ baseline | "
            "TTFT p50: baseline ÷ tokenmill |", "|---|---|---|---|---|"]
    for t, s in pairs:
        speed = t.output_throughput / s.output_throughput if s.output_throughput else float("inf")
        ttft = (s.ttft.p50 / t.ttft.p50) if s.ttft and t.ttft else float("nan")
        rows.append(f"| {t.label} | {s.label} | {s.concurrency} | **{speed:.2f}x** | {ttft:.2f}x |")
    return "\n".join(rows)


def plot(summaries: list[Summary], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(s.label for s in summaries):
        points = [s for s in summaries if s.label == label and s.ttft and s.itl]
        x = [s.output_throughput for s in points]
        for ax, metric in zip(axes, ("ttft", "itl")):
            y = [getattr(s, metric).p50 * 1000 for s in points]
            ax.plot(x, y, marker="o", label=label)
            for s, xi, yi in zip(points, x, y):
                ax.annotate(f"c={s.concurrency}" if s.request_rate is None else f"{s.request_rate:g}/s", (xi, yi),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, name in zip(axes, ("TTFT p50 (ms)", "inter-token latency p50 (ms)")):
        ax.set_xlabel("output tokens/s (all streams)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Throughput vs latency, one point per concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(args, summaries: list[Summary], workload: Workload, png: Path | None) -> str:
    import torch

    from models.loading import resolve_dtype
    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    if args.dtype == "auto":  # tokenmill on a CPU runs the path it measures fastest, not a dtype
        dtype = (f"auto (tokenmill: the fastest batch-invariant path it measured on this machine, named in its log; "
                 f"transformers: {dtype})")
    lines = [f"# Serving benchmark: {args.name}", "",
             f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {platform.processor() or platform.machine()} · "
             f"{os.cpu_count()} cores · torch {torch.__version__} · commit {_commit()}", "",
             f"CPU: {cpu_description()}", "",
             f"Model `{args.model}`, dtype {dtype}; llama.cpp runs the GGUF's own quantisation. "
             f"Workload: {workload.description}; "
             f"{'Poisson arrivals at %g req/s' % args.request_rate if args.request_rate else 'fixed concurrency'}"
             f" (requests per point: {', '.join(str(num_prompts(args, c)) for c in loads_of(args))}).", "",
             markdown_table(summaries), ""]
    ratios = ratio_table(summaries)
    if ratios:
        lines += [ratios, ""]
    if png is not None:
        lines += [f"![throughput vs latency]({png.name})", ""]
    lines += ["Command: `" + " ".join([".venv/bin/python benchmarks/serve_bench.py", *sys.argv[1:]]) + "`", ""]
    return "\n".join(lines)


def loads_of(args) -> list[int | None]:
    if args.request_rate is not None:
        return [args.concurrency]  # None: no cap on requests in flight
    if args.sweep:
        return [int(c) for c in args.sweep.split(",")]
    return [args.concurrency or 1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("what to benchmark")
    target.add_argument("--base-url", help="an OpenAI-compatible server already running (skips --systems)")
    target.add_argument("--model-name", default="default", help="model name sent with --base-url")
    target.add_argument("--systems", default="tokenmill,transformers",
                        help=f"servers to start and compare, comma-separated, from {','.join(SYSTEMS)}")
    target.add_argument("--model", default="default", help="model all systems serve (and whose tokenizer builds "
                                                           "the prompts)")
    target.add_argument("--dtype", default="auto", help="dtype for tokenmill and transformers")
    target.add_argument("--llama-server", help="path to llama.cpp's llama-server (make llama-server builds it)")
    target.add_argument("--api-key", help="bearer token for --base-url")
    load = p.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=int, help="requests in flight (with --request-rate: a cap)")
    load.add_argument("--sweep", help="comma-separated concurrencies, e.g. 1,8,32")
    load.add_argument("--request-rate", type=float, help="Poisson arrivals per second instead of a concurrency")
    load.add_argument("--num-prompts", type=int, help="requests per point (default: max(8, 4 x concurrency))")
    data = p.add_argument_group("prompts")
    data.add_argument("--dataset", default="synthetic", help="'synthetic' or a JSONL file of chat prompts")
    data.add_argument("--input-len", type=int, default=128)
    data.add_argument("--output-len", type=int, default=64)
    data.add_argument("--text-prompts", action="store_true", help="send synthetic prompts as text, not token ids")
    data.add_argument("--no-ignore-eos", action="store_true", help="let answers stop at EOS")
    data.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output")
    out.add_argument("--name", default="serve", help="results file stem under --results-dir")
    out.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    out.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.request_rate is not None and args.sweep:
        p.error("--sweep and --request-rate do not combine")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    loads = loads_of(args)
    print(TABLE_HEADER, flush=True)
    summaries: list[Summary] = []
    if args.base_url:
        summaries += bench_endpoint(args, args.model_name, args.base_url, args.model_name, loads)
    else:
        context = args.input_len + args.output_len + 64
        for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
            spec = ServerSpec(system, args.model, args.dtype, max(c or 32 for c in loads), context,
                              llama_server=args.llama_server)
            with LaunchedServer(spec) as server:
                summaries += bench_endpoint(args, system, server.base_url, "bench", loads)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    png = None if args.no_plot else results / f"{args.name}.png"
    if png is not None:
        plot(summaries, png)
    workload = make_workload(args, 1)
    text = report(args, summaries, workload, png)
    (results / f"{args.name}.md").write_text(text)
    (results / f"{args.name}.json").write_text(json.dumps(
        {"command": sys.argv, "workload": workload.description, "results": [s.to_dict() for s in summaries]},
        indent=1))
    print()
    print(ratio_table(summaries))
    print(f"\nwrote {results / args.name}.md, .json" + (", .png" if png else ""))
    return 1 if any(s.errors for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
