"""dtype="auto" on a CPU measures the paths (engine/path_choice.py): invariance is measured, not assumed, the
fastest invariant path wins, a non-invariant one never does, and the measurement is cached per machine."""
import json

import pytest
import torch

from engine import LLM
from engine import path_choice
from engine.path_choice import PathResult, choose_path, measure
from kernels import TORCH, get_backend
from models.loading import read_checkpoint


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A cache of path measurements of its own (the compiled kernels stay where they are)."""
    monkeypatch.setattr(path_choice, "_cache_file", lambda: tmp_path / "cpu_paths.json")
    return tmp_path


def test_each_path_is_measured_and_its_invariance_checked(tiny_checkpoint):
    checkpoint = read_checkpoint(str(tiny_checkpoint("qwen2")))
    backend = get_backend("auto", torch.device("cpu"))
    for name in ("float32", "bfloat16", "int4"):
        result = measure(name, checkpoint, backend)
        assert result.error is None and isinstance(result.invariant, bool)
        assert result.decode_1_ms > 0 and result.decode_16_ms > 0 and result.prefill_tok_s > 0 and result.score > 0
    # int4 switches to float32 GEMMs above 12 rows: the 16-row decode differs from one row at a time
    assert measure("int4", checkpoint, backend).invariant is False


def test_the_fastest_invariant_path_wins_and_the_choice_is_cached(tiny_checkpoint, cache_dir, monkeypatch):
    checkpoint = read_checkpoint(str(tiny_checkpoint("qwen2")))
    fake = {"float32": PathResult("float32", False, 1, 1, 1, score=90.0),
            "bfloat16": PathResult("bfloat16", True, 1, 1, 1, score=20.0),
            "int4": PathResult("int4", True, 1, 1, 1, score=30.0),
            "int8": PathResult("int8", False, 1, 1, 1, score=99.0)}
    monkeypatch.setattr(path_choice, "measure", lambda name, *a: fake[name])
    chosen, results = choose_path(checkpoint, TORCH)
    assert chosen == "int4"  # float32 and int8 score higher but change with the batch
    assert {r.path for r in results} == set(path_choice.eligible(checkpoint))
    cached = json.loads((cache_dir / "cpu_paths.json").read_text())
    assert [entry["chosen"] for entry in cached.values()] == ["int4"]

    def fail(*a):
        raise AssertionError("measured again instead of reading the cache")
    monkeypatch.setattr(path_choice, "measure", fail)
    assert choose_path(checkpoint, TORCH)[0] == "int4"


def test_with_no_invariant_path_float32_runs(tiny_checkpoint, cache_dir, monkeypatch):
    checkpoint = read_checkpoint(str(tiny_checkpoint("qwen2")))
    monkeypatch.setattr(path_choice, "measure", lambda name, *a: PathResult(name, False, 1, 1, 1, score=1.0))
    assert choose_path(checkpoint, TORCH)[0] == "float32"


def test_auto_runs_the_chosen_path_and_explicit_settings_skip_the_measurement(tiny_checkpoint, cache_dir,
                                                                            monkeypatch):
    model = str(tiny_checkpoint("qwen2"))
    llm = LLM(model, num_kv_blocks=64, max_model_len=128, enforce_eager=True)
    entry = next(iter(json.loads((cache_dir / "cpu_paths.json").read_text()).values()))
    assert llm.engine.path == entry["chosen"]
    chosen = next(r for r in entry["results"] if r["path"] == entry["chosen"])
    assert chosen["invariant"] or not any(r["invariant"] for r in entry["results"])
    monkeypatch.setattr(path_choice, "measure", lambda *a: pytest.fail("explicit settings were measured"))
    assert LLM(model, dtype="float32", num_kv_blocks=64, max_model_len=128, enforce_eager=True).engine.path == \
        "float32"
    assert LLM(model, quantization="int4", num_kv_blocks=64, max_model_len=128, enforce_eager=True).engine.path == \
        "int4"
