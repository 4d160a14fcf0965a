"""dtype="auto" on a CPU: time each eligible path on the loaded model, then run the fastest batch-invariant one.

A path is a dtype and a weight format: float32, bfloat16, int4 (torch's int4 kernel), int8 (an int8 output head),
gguf (a GGUF file's own Q4_1 / Q8_0 blocks through kernels/cpu_ops.py). CPU flags say little about which is
fastest (the same path has been 2-4x faster on one machine of our kind and slower on the next), so each candidate
is built from the same loaded weights and measured on this machine:
- invariance: 4 short prompts are prefilled two ways (alone, and in pairs in one step) and decoded three ways
  (alone, in pairs, all 4 together); the path is batch-invariant when every sequence's logits are bit-identical
  every way. Kernels decide this (MKL's float32 GEMM, for one, rounds a row differently with the number of rows),
  so it is measured, not assumed.
- speed: the best of a few eager decode steps at batch 1 and 16 (128-token contexts, whose cache contents do not
  matter for timing) and of a 128-token prefill; the score is the geometric mean of the three token rates.
The fastest invariant path wins; a path that is not invariant runs only when asked for by name. The table goes to
the log and, with the choice, to a JSON cache (TOKENMILL_CACHE_DIR) keyed by the CPU, torch, the thread count and
the model file, so later starts read it instead of measuring.
"""
import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.model_runner import ModelRunner, kv_cache_dtype
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kernels import Backend, cache_dir, for_dtype
from models.loading import Checkpoint, build_model

logger = logging.getLogger(__name__)

# name -> (dtype, quantization)
PATHS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "int4": ("float32", "int4"),
         "int8": ("float32", "int8"), "gguf": ("float32", "gguf")}
_CHECKED, _TIMED, _CONTEXT, _BLOCK = 4, 16, 128, 16
_VERSION = 2  # bump when what is measured changes, so cached choices are measured again (2: float16 KV for gguf)


@dataclass
class PathResult:
    path: str
    invariant: bool | None = None
    decode_1_ms: float | None = None
    decode_16_ms: float | None = None
    prefill_tok_s: float | None = None
    score: float | None = None
    error: str | None = None


def _machine_key(checkpoint: Checkpoint) -> str:
    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(("model name", "flags"))]
        cpu = " ".join(dict.fromkeys(names))
    except OSError:
        cpu = platform.processor()
    stat = checkpoint.path.stat()
    parts = [str(_VERSION), cpu, torch.__version__, str(torch.get_num_threads()), str(checkpoint.path.resolve()),
             str(stat.st_size), str(int(stat.st_mtime))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _cache_file() -> Path:
    return cache_dir() / "cpu_paths.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(key: str, results: list[PathResult], chosen: str) -> None:
    cache = _read_cache()
    cache[key] = {"chosen": chosen, "results": [asdict(r) for r in results]}
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError as e:
        logger.warning("could not cache the path measurement in %s: %s", path, e)


def eligible(checkpoint: Checkpoint) -> list[str]:
    """The paths worth measuring for this checkpoint on this CPU."""
    names = ["float32", "bfloat16", "int4"]
    if "fbgemm" in torch.backends.quantized.supported_engines:
        names.append("int8")
    if checkpoint.has_quantized:
        from kernels import cpu_ops
        if cpu_ops.missing() is None:
            names.append("gguf")
    return names


class _Bench:
    """A model on a small KV cache, driven step by step as the engine drives it (eager steps)."""

    def __init__(self, model, backend: Backend, vocab: int, quantization: str | None, seed: int = 0):
        blocks_each = -(-(_CONTEXT + 1) // _BLOCK)  # room for the decoded token too
        self.blocks = BlockManager((_CHECKED + _TIMED) * blocks_each, _BLOCK, False)
        dtype = next(model.parameters()).dtype
        self.runner = ModelRunner(model, self.blocks.num_blocks, _BLOCK, dtype, torch.device("cpu"), backend,
                                  kv_dtype=kv_cache_dtype("auto", dtype, quantization, backend))
        g = torch.Generator().manual_seed(seed)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

        def seq(i: int, length: int) -> Sequence:
            s = Sequence(i, f"bench-{i}", 0, torch.randint(3, vocab, (length,), generator=g).tolist(), params)
            assert self.blocks.allocate(s)
            return s
        self.checked = [seq(i, 16 + 3 * i) for i in range(_CHECKED)]
        self.timed = [seq(_CHECKED + i, _CONTEXT) for i in range(_TIMED)]

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Last-token logits of a prefill of these whole prompts, in one step."""
        for s in seqs:
            s.num_cached_tokens, s.num_scheduled_tokens = 0, s.num_tokens
        logits = self.runner.run(seqs, True)
        for s in seqs:
            s.num_cached_tokens, s.num_scheduled_tokens = s.num_tokens, 0
        return logits

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits of one decode step of these sequences (their last token's K/V written again each time)."""
        for s in seqs:
            if not s.output_token_ids:
                s.output_token_ids.append(s.prompt_token_ids[0])
                self.blocks.append_slot(s)
            s.num_cached_tokens, s.num_scheduled_tokens = s.num_tokens - 1, 1
        return self.runner.run(seqs, False)


def _best(fn, repeat: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure(name: str, checkpoint: Checkpoint, backend: Backend) -> PathResult:
    dtype, quantization = PATHS[name]
    try:
        model = build_model(checkpoint, dtype, torch.device("cpu"), quantization)
    except (ValueError, RuntimeError) as e:
        return PathResult(name, error=str(e))
    if dtype == "float32" and quantization != "int8":
        from models.cpu_linear import use_cpu_linears
        use_cpu_linears(model)  # as the engine runs float32 (models/cpu_linear.py)
    bench = _Bench(model, for_dtype(backend, next(model.parameters()).dtype), checkpoint.config.vocab_size,
                   quantization)
    seqs = bench.checked
    alone = [bench.prefill([s]) for s in seqs]
    invariant = all(torch.equal(bench.prefill(seqs[i:i + 2]), torch.cat(alone[i:i + 2]))
                    for i in range(0, len(seqs), 2))
    alone = torch.cat([bench.decode([s]) for s in seqs])
    invariant = invariant and torch.equal(bench.decode(seqs), alone) and all(
        torch.equal(bench.decode(seqs[i:i + 2]), alone[i:i + 2]) for i in range(0, len(seqs), 2))
    timed = bench.timed
    prefill = _best(lambda: bench.prefill(timed[:1]), 1)  # before it decodes: the whole prompt
    one = _best(lambda: bench.decode(timed[1:2]), 3)
    many = _best(lambda: bench.decode(timed), 2)
    rates = (1 / one, _TIMED / many, timed[0].num_tokens / prefill)
    return PathResult(name, invariant, one * 1e3, many * 1e3, rates[2], math.exp(sum(math.log(r) for r in rates) / 3))


def table(results: list[PathResult], chosen: str | None) -> str:
    rows = ["| path | batch-invariant | decode ms, 1 seq | decode ms, 16 seqs | prefill tok/s | score |",
            "|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            rows.append(f"| {r.path} | unavailable: {r.error} | | | | |")
            continue
        mark = " (chosen)" if r.path == chosen else ""
        rows.append(f"| {r.path}{mark} | {'yes' if r.invariant else 'no'} | {r.decode_1_ms:.1f} | "
                    f"{r.decode_16_ms:.1f} | {r.prefill_tok_s:.0f} | {r.score:.1f} |")
    return "\n".join(rows)


def choose_path(checkpoint: Checkpoint, backend: Backend) -> tuple[str, list[PathResult]]:
    """The fastest batch-invariant path for this checkpoint on this machine (measured once, then cached)."""
    key = _machine_key(checkpoint)
    cached = _read_cache().get(key)
    if cached:
        results = [PathResult(**r) for r in cached["results"]]
        logger.info("CPU paths for %s, measured earlier on this machine:\n%s", checkpoint.path.name,
                    table(results, cached["chosen"]))
        return cached["chosen"], results
    start = time.perf_counter()
    results = [measure(name, checkpoint, backend) for name in eligible(checkpoint)]
    ok = [r for r in results if r.invariant]
    if ok:
        chosen = max(ok, key=lambda r: r.score).path
    else:
        chosen = "float32"
        logger.warning("no path measured batch-invariant here: running float32 (greedy outputs may change with "
                       "the batch at float32 rounding)")
    logger.info("CPU paths for %s, measured in %.0f s (cached in %s):\n%s", checkpoint.path.name,
                time.perf_counter() - start, _cache_file(), table(results, chosen))
    _write_cache(key, results, chosen)
    return chosen, results
