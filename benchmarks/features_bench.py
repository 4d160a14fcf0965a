"""What prefix caching and chunked prefill buy, each measured on and off in one run against a fresh server.

1. Prefix caching: 64 chat requests sharing a ~400-token system prompt (a different question each), 4 in flight,
   32 output tokens: TTFT with the cache on vs `--no-prefix-caching`, and the hit rate from /metrics.
2. Chunked prefill: 16 streams decode (64-token prompts, 96 output tokens each); once they run, a 2,000-token
   prompt arrives. Inter-token latency of the 16 streams with 512-token chunks vs the whole prompt in one step
   (`--max-num-batched-tokens 4096`).

    .venv/bin/python benchmarks/features_bench.py          # writes benchmarks/results/features_cpu.md
"""
import argparse
import asyncio
import datetime
import os
import platform
import sys
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_client import BenchRequest, run_load, send  # noqa: E402
from benchmarks.bench_stats import summarize  # noqa: E402
from benchmarks.launch import LaunchedServer, ServerSpec  # noqa: E402
from benchmarks.offline_throughput import workload  # noqa: E402
from models.loading import load_tokenizer  # noqa: E402


def _metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"tokenmill:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def prefix_caching(args, tokenizer) -> list[str]:
    system_ids = workload(tokenizer, 1, (400, 400), (1, 1), seed=7)[0][0]
    system = {"role": "system", "content": tokenizer.decode(system_ids)}
    questions = [f"Question {i}: in one sentence, what is item number {i} about?" for i in range(64)]
    requests = [BenchRequest(max_tokens=32, messages=[system, {"role": "user", "content": q}]) for q in questions]
    rows = ["| prefix caching | TTFT p50 ms | TTFT p90 ms | E2E p50 s | out tok/s | prefix cache hit rate |",
            "|---|---|---|---|---|---|"]
    ttft = {}
    for label, extra in (("on", ()), ("off", ("--no-prefix-caching",))):
        with LaunchedServer(ServerSpec("tokenmill", args.model, args.dtype, 32, 1024, extra_args=extra)) as server:
            asyncio.run(run_load(server.base_url, "bench", requests[:1], concurrency=1))  # warm-up
            s = summarize(asyncio.run(run_load(server.base_url, "bench", requests, concurrency=4)), label, 4)
            hits, queries = _metric(server.base_url, "prefix_cache_hits_total"), _metric(
                server.base_url, "prefix_cache_queries_total")
        ttft[label] = s.ttft.p50
        rate = f"{hits / queries:.0%} ({hits:.0f} of {queries:.0f} prompt tokens)" if queries else "-"
        rows.append(f"| {label} | {s.ttft.p50 * 1000:.0f} | {s.ttft.p90 * 1000:.0f} | {s.e2e.p50:.2f} | "
                    f"{s.output_throughput:.1f} | {rate} |")
        print(rows[-1], flush=True)
    rows += ["", f"**TTFT p50 with the cache = {ttft['on'] / ttft['off']:.2f} of without.**"]
    return rows


async def _streams_with_a_long_prompt(base_url: str, streams: list[BenchRequest], long: BenchRequest):
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        running = [asyncio.create_task(send(client, "bench", r)) for r in streams]
        await asyncio.sleep(1.5)  # the 16 streams are decoding by now
        long_record = await send(client, "bench", long)
        return await asyncio.gather(*running), long_record


def chunked_prefill(args, tokenizer) -> list[str]:
    pairs = workload(tokenizer, 16, (64, 64), (96, 96), seed=3)
    streams = [BenchRequest(max_tokens=96, prompt=ids, prompt_tokens=64) for ids, _ in pairs]
    long_ids = workload(tokenizer, 1, (2000, 2000), (1, 1), seed=9)[0][0]
    long = BenchRequest(max_tokens=1, prompt=long_ids, prompt_tokens=2000)
    rows = ["| prefill | streams' ITL p50 ms | ITL p99 ms | ITL max ms | long prompt's TTFT s |", "|---|---|---|---|---|"]
    p99 = {}
    for label, budget in (("chunks of 512 tokens", "512"), ("whole prompt in one step", "4096")):
        spec = ServerSpec("tokenmill", args.model, args.dtype, 32, 2200,
                          extra_args=("--max-num-batched-tokens", budget, "--no-prefix-caching"))
        with LaunchedServer(spec) as server:
            asyncio.run(run_load(server.base_url, "bench", streams[:2], concurrency=2))  # warm-up
            records, long_record = asyncio.run(_streams_with_a_long_prompt(server.base_url, streams, long))
        s = summarize(records, label, 16)
        p99[budget] = s.itl.p99
        rows.append(f"| {label} | {s.itl.p50 * 1000:.0f} | {s.itl.p99 * 1000:.0f} | "
                    f"{max(g for r in records for g in r.itl) * 1000:.0f} | {long_record.ttft:.2f} |")
        print(rows[-1], flush=True)
    rows += ["", f"**ITL p99 with chunked prefill = {p99['512'] / p99['4096']:.2f} of without.**"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "features_cpu.md"))
    args = p.parse_args()
    tokenizer = load_tokenizer(args.model)
    lines = ["# Prefix caching and chunked prefill", "",
             f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {platform.machine()} · {os.cpu_count()} cores · "
             f"torch {torch.__version__} · model `{args.model}` · dtype {args.dtype}", "",
             "## Prefix caching: 64 chats sharing a 400-token system prompt, 4 in flight, 32 output tokens", "",
             *prefix_caching(args, tokenizer), "",
             "## Chunked prefill: a 2,000-token prompt arrives while 16 streams decode", "",
             *chunked_prefill(args, tokenizer), "",
             "Command: `.venv/bin/python benchmarks/features_bench.py " + " ".join(sys.argv[1:]) + "`", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
