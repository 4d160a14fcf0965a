"""The GPU benchmark scripts, as far as a CPU can run them: gpu_check.sh keeps going past failing and hanging steps
and reports every status; gpu_offline.py writes a Qwen3-0.6B-shaped model our loader reads at its real size, draws
nano-vllm's workload, and runs end to end (tiny, eager) to a report in which every request got its max_tokens."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_offline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# not installed on the GPU machine: nothing the scripts run may import them
ABSENT_ON_GPU = ("fastapi", "uvicorn", "gguf", "xgrammar", "jinja2", "jsonschema", "prometheus_client")


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-m pytest") echo "kernel tests failed"; exit 3 ;;
  benchmarks/gpu_offline.py*) echo "offline hangs"; exec sleep 60 ;;
  *) echo "env ok" ;;
esac
"""


def test_gpu_check_goes_past_a_failing_step_bounds_a_hanging_one_and_reports_all(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    (results / "gpu_offline.md").write_text("stale, from an earlier run")
    (results / "gpu_kernels.md").write_text("stale, from an earlier run")
    env = {**os.environ, "PYTHON": str(fake), "GPU_CHECK_BUDGET": "8", "RESULTS_DIR": str(results),
           "LOG_DIR": str(tmp_path / "logs"), "OUT": str(out)}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = (out / "gpu_check_summary.txt").read_text()
    status = {line.split()[0]: line for line in summary.splitlines() if line}
    assert " ok " in status["env"] and "FAILED (exit 3)" in status["kernel_tests"]
    assert "TIMEOUT" in status["offline"]  # the hang ate the rest of the 8 s budget...
    assert "SKIPPED" in status["kernels_bench"]  # ...so the last step is skipped, and says so
    assert "gpu_offline.md NOT written by this run" in summary and "gpu_kernels.md NOT written" in summary
    # flat names; results older than the run stay behind
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_check_summary.txt"] + [f"gpu_check_{s}.log" for s in ("env", "kernel_tests", "offline")])
    assert "kernel tests failed" in (out / "gpu_check_kernel_tests.log").read_text()


def test_written_qwen3_config_loads_at_qwen3_0_6b_size(tmp_path):
    from models.llama import LlamaForCausalLM
    from models.loading import load_config, load_tokenizer
    gpu_offline.write_model_dir(tmp_path, gpu_offline.QWEN3_0_6B)
    cfg = load_config(str(tmp_path))
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("Qwen3ForCausalLM", 151936, 1024, 3072, 28, 16, 8, 128)
    assert cfg.qk_norm and cfg.tie_word_embeddings and not cfg.qkv_bias and cfg.sliding_window is None
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e6, 1e-6, 40960)
    assert cfg.rope_scaling is None and cfg.eos_token_ids == [151645]

    h, d = cfg.hidden_size, cfg.head_dim
    attention = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 2 * d  # q, k, v, o; q/k norms
    layer = attention + 3 * h * cfg.intermediate_size + 2 * h
    expected = cfg.vocab_size * h + cfg.num_layers * layer + h  # tied head: the embedding once
    assert 0.59e9 < expected < 0.60e9  # Qwen3-0.6B: 0.6B in all, 0.44B without the embedding
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected

    tok = load_tokenizer(str(tmp_path))
    assert tok.vocab_size == 151936 and tok.eos_token_ids == {151645}
    assert tok.decode([7, 151645, 151935]) == "t7 t151935"  # specials skipped


def test_workload_b_draws_what_nano_vllm_bench_draws():
    work = gpu_offline.build_workloads(tiny=False)["b"]
    random.seed(0)  # bench.py's own calls, on the module-level generator
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    assert work.prompts == prompts
    assert work.max_tokens == [random.randint(100, 1024) for _ in range(256)]
    a = gpu_offline.build_workloads(tiny=False)["a"]
    assert len(a.prompts) == 500 and {len(p) for p in a.prompts} == {512} and set(a.max_tokens) == {128}
    assert not {tuple(p[:16]) for p in a.prompts} & {tuple(p[:16]) for p in work.prompts}  # no shared block


def test_decode_ratio_is_judged_only_where_both_modes_ran_and_within_the_target_batches():
    rows = gpu_offline.decode_rows({1: {"graphs": (0.002, 500.0), "eager": (0.006, 166.0)},
                                    8: {"eager": (0.007, 1100.0)},
                                    64: {"graphs": (0.004, 16000.0), "eager": (0.006, 10000.0)}}, tiny=False)
    assert rows[0][3] == "3.00x" and "yes" in rows[0][-1]
    assert rows[1][1] == "—" and rows[1][3] == "—" and rows[1][-1] == "—"
    assert rows[2][3] == "1.50x" and rows[2][-1] == "—"  # batch 64: reported, not judged


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Markdown sections -> the cells of their table rows, the header row left out."""
    tables: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
            tables[title] = []
        elif line.startswith("| "):  # not the |---| separator
            tables[title].append([c.strip() for c in line.strip("|").split("|")])
    return {t: rows[1:] for t, rows in tables.items()}


@pytest.mark.slow
def test_tiny_run_on_cpu_reports_every_table_with_exact_token_counts(tmp_path):
    """End to end in a fresh interpreter in which the packages the GPU machine lacks cannot be imported
    (transformers included: it must run without them)."""
    out = tmp_path / "tiny.md"
    argv = ["--tiny", "--attention-backend", "torch", "--decode-batches", "1,3", "--out", str(out)]
    code = (f"import sys\nfor m in {ABSENT_ON_GPU!r}: sys.modules[m] = None\n"
            f"from benchmarks import gpu_offline\ngpu_offline.main({json.dumps(argv)})\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Offline throughput: CPU") and f"torch {torch.__version__}" in text
    tables = _tables(text)
    works = gpu_offline.build_workloads(tiny=True)
    setup, a, b, decode = (tables[next(t for t in tables if t.startswith(p))] for p in
                           ("Engine start-up", "Workload (a)", "Workload (b)", "Decode step"))
    assert [row[0] for row in setup] == ["eager"]  # on a CPU, --tiny runs eager only
    for rows, work in ((a, works["a"]), (b, works["b"])):
        n, total = len(work.prompts), sum(work.max_tokens)
        for system, requests, exact, tokens, seconds, rate, *_ in rows:
            assert (requests, exact, tokens) == (str(n), f"{n}/{n}", str(total)), system
            assert float(seconds) > 0 and float(rate.replace(",", "")) > 0
    assert [row[0] for row in a] == ["tokenmill eager", a[1][0]] and a[1][0].startswith("transformers")
    assert [row[0] for row in decode] == ["1", "3"]
    for batch, graphs, eager, ratio, *_ in decode:
        assert graphs == ratio == "—" and float(eager) > 0


def test_a_mode_that_fails_is_reported_and_the_next_mode_still_runs(tmp_path, monkeypatch):
    started = []

    def failing_llm(model, enforce_eager, **kwargs):
        started.append("eager" if enforce_eager else "graphs")
        raise RuntimeError("capture failed")

    monkeypatch.setattr(gpu_offline, "LLM", failing_llm)
    out = tmp_path / "r.md"
    report = gpu_offline.main(["--tiny", "--modes", "graphs,eager", "--no-transformers", "--out", str(out)])
    assert started == ["graphs", "eager"]
    assert report.errors == [f"- tokenmill {m}: `RuntimeError: capture failed`" for m in ("graphs", "eager")]
    text = out.read_text()
    assert "## Errors" in text and text.count("_not measured_") == 4  # start-up, (a), (b), decode
