"""serve_bench end to end: its CLI against the real server, and the transformers baseline server it launches."""
import asyncio
import json

import httpx
import pytest

from benchmarks import serve_bench
from benchmarks.bench_client import BenchRequest, run_load
from benchmarks.launch import LaunchedServer, ServerSpec

pytestmark = pytest.mark.slow


def test_cli_sweep_and_jsonl_rate_write_results(server, tmp_path):
    common = ["--base-url", server.base_url, "--model-name", "smollm2", "--api-key", server.api_key,
              "--results-dir", str(tmp_path), "--output-len", "4"]
    assert serve_bench.main([*common, "--sweep", "1,2", "--num-prompts", "2", "--input-len", "16",
                             "--name", "sweep"]) == 0
    saved = json.loads((tmp_path / "sweep.json").read_text())["results"]
    assert [r["concurrency"] for r in saved] == [1, 2]
    assert all(r["completed"] == 2 and r["errors"] == 0 for r in saved)
    assert all(r["output_throughput"] == pytest.approx(8 / r["duration"]) for r in saved)  # 2 x 4 tokens
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| smollm2 | 2 | 2 | 0 |" in (tmp_path / "sweep.md").read_text()

    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q}]})
                                 for q in ("Hi!", "Name a colour.")))
    assert serve_bench.main([*common, "--dataset", str(prompts), "--request-rate", "20", "--num-prompts", "3",
                             "--name", "rate", "--no-plot"]) == 0
    rate = json.loads((tmp_path / "rate.json").read_text())["results"][0]
    assert rate["request_rate"] == 20 and rate["completed"] == 3 and rate["ttft"]["p50"] > 0


def test_transformers_baseline_serves_the_same_greedy_tokens_as_tokenmill(tiny_checkpoint):
    from engine import LLM, SamplingParams
    model = str(tiny_checkpoint("llama"))
    prompts = [[5, 17, 42, 99, 123], [7, 8, 9]]
    expected = [o.outputs[0].text for o in LLM(model, dtype="float32", num_kv_blocks=32).generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    with LaunchedServer(ServerSpec("transformers", model=model, dtype="float32", max_concurrency=4)) as baseline:
        # streamed, in one static batch of two left-padded prompts
        records = asyncio.run(run_load(baseline.base_url, "m", [BenchRequest(12, p) for p in prompts],
                                       concurrency=2))
        assert all(r.ok and r.output_tokens == 12 for r in records)
        texts = [httpx.post(f"{baseline.base_url}/v1/completions", timeout=60, json={
            "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()["choices"][0]["text"]
                 for p in prompts]
    assert texts == expected
