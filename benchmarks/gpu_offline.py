"""End-to-end offline throughput on a GPU: tokenmill on a random-weight Qwen3-0.6B-shaped model, with CUDA graphs
and eager, against published anchors and against transformers on the same machine.

Workloads (EOS ignored, greedy, every request produces exactly its max_tokens):
- (a) vLLM's serving benchmark shape: 500 prompts of 512 random token ids -> 128 output tokens, all at once
  (anchor: vLLM 0.19 on an H100, ~12.1k output tok/s, published);
- (b) nano-vllm's bench.py: 256 sequences, prompt and output lengths uniform in [100, 1024], prompt ids
  randint(0, 10000), `random.seed(0)` (anchor: nano-vllm-triton on an A800, 10.0k tok/s, where tok/s is the
  total of generated tokens / time: the output tok/s column here);
- decode only: steady-state milliseconds per `engine.step()` at batch 1-256, CUDA graphs against eager
  (target: graphs >= 2x faster at batch <= 32);
- transformers on (a): `from_config` random weights, sdpa, greedy `generate` in static batches.
The model directory (config.json + a WordLevel tokenizer of the full vocabulary) is written by this script;
the engine gives it random weights (load_format="dummy"). The markdown report is rewritten after every result,
so a run cut short by a timeout still leaves what it measured.

    python3 benchmarks/gpu_offline.py                                # everything; writes results/gpu_offline.md
    python3 benchmarks/gpu_offline.py --workloads a --modes graphs --no-transformers --decode-batches 1,32
    .venv/bin/python benchmarks/gpu_offline.py --tiny --attention-backend torch --out /tmp/tiny.md  # CPU smoke run
"""
import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from models.loading import resolve_dtype  # noqa: E402

# Qwen3-0.6B's shape (its config.json); bos/eos as Qwen's tokenizer numbers them
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                  eos_token_id=151645)
TINY = dict(QWEN3_0_6B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
            bos_token_id=509, eos_token_id=511)

TARGETS = {"a": (12_100, "≥ 12.1k output tok/s (vLLM 0.19, H100)"),
           "b": (10_000, "≥ 10.0k tok/s (nano-vllm-triton, A800)")}
DECODE_TARGET = (2.0, 32)  # graphs at least this many times faster than eager, at batch sizes up to this one


def qwen3_config(shape: dict) -> dict:
    """A Qwen3ForCausalLM config.json, as transformers writes one (rope theta in both spellings)."""
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **shape, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "default", "rope_theta": shape["rope_theta"]}, "rope_scaling": None,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": shape["num_hidden_layers"],
            "use_cache": True, "dtype": "bfloat16"}


def write_model_dir(directory: Path, shape: dict) -> Path:
    """config.json plus a tokenizer our loader and transformers accept: a WordLevel vocabulary of exactly
    vocab_size tokens ("t<id>"), with <unk> at 0 and Qwen's three special tokens at their ids."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(qwen3_config(shape), indent=2))
    return write_word_tokenizer(directory, shape)


def write_word_tokenizer(directory: Path, shape: dict) -> Path:
    """write_model_dir's tokenizer alone (shape: vocab_size, bos_token_id, eos_token_id, max_position_embeddings)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    bos = shape["bos_token_id"]
    specials = {0: "<unk>", bos: "<|endoftext|>", bos + 1: "<|im_start|>", shape["eos_token_id"]: "<|im_end|>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    assert tok.get_vocab_size(with_added_tokens=True) == shape["vocab_size"]
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
        "add_bos_token": False, "model_max_length": shape["max_position_embeddings"]}))
    return directory


# ---- workloads: (prompt token ids, output lengths) ----------------------------------------------------------------

@dataclass
class Workload:
    key: str
    title: str
    prompts: list[list[int]]
    max_tokens: list[int]


def vllm_random_workload(num_prompts: int, prompt_len: int, output_len: int, max_id: int, seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, max_id) for _ in range(prompt_len)] for _ in range(num_prompts)]
    return Workload("a", f"(a) vLLM serving benchmark shape: {num_prompts} prompts × {prompt_len} random token ids "
                         f"→ {output_len} output tokens, all submitted at once", prompts, [output_len] * num_prompts)


def nano_vllm_workload(num_seqs: int, min_len: int, max_len: int, max_id: int) -> Workload:
    """As nano-vllm's bench.py draws it after `random.seed(0)`: all prompts first, then all output lengths."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, max_id) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_seqs)]
    max_tokens = [rng.randint(min_len, max_len) for _ in range(num_seqs)]
    return Workload("b", f"(b) nano-vllm bench.py: {num_seqs} sequences, prompt and output lengths uniform in "
                         f"[{min_len}, {max_len}], ids randint(0, {max_id}), seed 0", prompts, max_tokens)


def ordinary_ids(shape: dict) -> int:
    """The bound of the token ids drawn for prompts: nano-vllm's 10000, and no special token in a tiny vocab."""
    return min(10_000, shape["bos_token_id"] - 1)


def build_workloads(tiny: bool) -> dict[str, Workload]:
    if tiny:
        max_id = ordinary_ids(TINY)
        return {"a": vllm_random_workload(6, 24, 8, max_id, seed=1), "b": nano_vllm_workload(5, 8, 32, max_id)}
    # (a) draws from the whole ordinary vocabulary, as vLLM's random dataset does
    return {"a": vllm_random_workload(500, 512, 128, QWEN3_0_6B["bos_token_id"], seed=1),
            "b": nano_vllm_workload(256, 100, 1024, 10_000)}


# ---- the report: markdown rewritten after every result --------------------------------------------------------------

@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def lines(self) -> list[str]:
        out = [f"## {self.title}", ""] + ([self.note, ""] if self.note else [])
        if not self.rows:
            return out + ["_not measured_", ""]
        out += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        return out + ["| " + " | ".join(row) + " |" for row in self.rows] + [""]


class Report:
    def __init__(self, path: Path, head: list[str]):
        self.path, self.head, self.tables = path, head, {}
        self.errors: list[str] = []

    def table(self, key: str, title: str, header: list[str], note: str = "") -> Table:
        if key not in self.tables:
            self.tables[key] = Table(title, header, note=note)
        return self.tables[key]

    def add(self, key: str, row: list[str]) -> None:
        table = self.tables[key]
        table.rows.append(row)
        print("\n".join(table.lines()[:-1]) if len(table.rows) == 1 else "| " + " | ".join(row) + " |", flush=True)
        self.write()

    def error(self, what: str, e: Exception) -> None:
        """A measurement that raised: its traceback goes to stderr, one line to the report, and the run goes on."""
        traceback.print_exc()
        self.errors.append(f"- {what}: `{type(e).__name__}: {str(e)[:300]}`")
        self.write()

    def text(self) -> str:
        errors = ["## Errors", "", *self.errors, ""] if self.errors else []
        return "\n".join(self.head + [line for t in self.tables.values() for line in t.lines()] + errors)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text())


# ---- measurements ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    requests: int
    prompt_tokens: int
    output_tokens: int
    exact: int  # requests that produced exactly their max_tokens
    seconds: float
    preemptions: int = 0


def run_tokenmill(llm: LLM, work: Workload) -> Run:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.max_tokens]
    preempted = llm.engine.num_preemptions
    start = time.perf_counter()
    outputs = llm.generate(work.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    return Run(len(outputs), sum(map(len, work.prompts)), sum(produced),
               sum(p == n for p, n in zip(produced, work.max_tokens)), seconds,
               llm.engine.num_preemptions - preempted)


def warm_up(llm: LLM, max_id: int) -> None:
    """A few prompts of mixed lengths through prefill and decode, so that the timed runs compile nothing. Their
    own seed: a warm-up prompt must not put a timed prompt's blocks in the prefix cache."""
    rng = random.Random(12345)
    prompts = [[rng.randrange(1, max_id) for _ in range(rng.randint(17, 130))] for _ in range(8)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)


def decode_step_seconds(llm: LLM, batch: int, steps: int, max_id: int, prompt_len: int = 32,
                        warm_steps: int = 3) -> list[float]:
    """Seconds of each of `steps` pure decode steps of `batch` sequences (host sync included: sampled tokens come
    back to the host every step). Requests are added straight to the engine, stepped past their prefill, timed,
    then aborted."""
    engine = llm.engine
    rng = random.Random(1000 + batch)
    # room for the tokens early requests decode while later prompts prefill; all are aborted at the end
    params = SamplingParams(temperature=0, max_tokens=warm_steps + steps + 64, ignore_eos=True)
    ids = [f"decode-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(1, max_id) for _ in range(prompt_len)], params)
    try:
        started: set[str] = set()  # requests with a first token: their prompt is done
        while len(started) < batch:
            for out in engine.step():
                if out.error:
                    raise RuntimeError(f"decode measurement request {out.request_id} failed: {out.error}")
                if out.outputs[0].token_ids:
                    started.add(out.request_id)
        for _ in range(warm_steps):
            engine.step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            advanced = engine.step()
            times.append(time.perf_counter() - start)
            assert len(advanced) == batch, f"a decode step of batch {batch} advanced {len(advanced)} requests"
    finally:
        for rid in ids:
            engine.abort_request(rid)
    return times


def run_transformers(model_dir: Path, work: Workload, batch_size: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[Run, int]:
    """Static batches of `batch_size` (halved on out-of-memory), greedy, exactly max_tokens new tokens each.
    All prompts have one length, so no padding. Returns the run and the batch size it used."""
    import transformers
    new = work.max_tokens[0]
    assert len(set(map(len, work.prompts))) == 1 and len(set(work.max_tokens)) == 1
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    pad = config.eos_token_id

    def generate(prompts: list[list[int]], tokens: int) -> torch.Tensor:
        ids = torch.tensor(prompts, device=device)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=pad)

    with torch.inference_mode():
        while True:
            try:
                generate(work.prompts[:batch_size], 4)  # warm-up at the batch size of the timed run
                start = time.perf_counter()
                for i in range(0, len(work.prompts), batch_size):
                    out = generate(work.prompts[i:i + batch_size], new)
                    assert out.shape[1] == len(work.prompts[0]) + new
                seconds = time.perf_counter() - start
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
            batch_size //= 2  # out here the exception, and the tensors its frames held, are gone
            _free_device_memory()
    del model
    n = len(work.prompts)
    return Run(n, sum(map(len, work.prompts)), n * new, n, seconds), batch_size


def transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---- the run --------------------------------------------------------------------------------------------------------

def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _verdict(ok: bool, tiny: bool) -> str:
    return "n/a (tiny)" if tiny else ("**yes**" if ok else "no")


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _decode_step_kind(llm: LLM) -> str:
    """What runs the decode steps (engine internals, read for the report only: "?" if they moved)."""
    runner = llm.engine.runner
    if not hasattr(runner, "decode_step"):
        return "?"
    if runner.decode_step is None:
        return "eager"
    graphs = getattr(runner.decode_step, "graphs", None)
    return f"CUDA graphs ({len(graphs)} batch sizes)" if graphs else "torch.compile"


def decode_rows(decode: dict[int, dict[str, tuple[float, float]]], tiny: bool) -> list[list[str]]:
    """Rows of the decode table from {batch: {mode: (median seconds per step, tok/s)}}."""
    rows = []
    for batch, by_mode in decode.items():
        if not by_mode:
            continue
        cells = [str(batch)] + [f"{by_mode[m][0] * 1e3:.2f}" if m in by_mode else "—" for m in ("graphs", "eager")]
        ratio = by_mode["eager"][0] / by_mode["graphs"][0] if len(by_mode) == 2 else None
        cells.append("—" if ratio is None else f"{ratio:.2f}x")
        cells += [_rate(by_mode[m][1]) if m in by_mode else "—" for m in ("graphs", "eager")]
        target, up_to = DECODE_TARGET
        judged = ratio is not None and batch <= up_to
        cells.append(f"≥ {target:.0f}x: {_verdict(ratio >= target, tiny)}" if judged else "—")
        rows.append(cells)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="a,b", help="comma-separated: a (vLLM shape), b (nano-vllm bench)")
    p.add_argument("--modes", default=None, help="comma-separated: graphs, eager (default both; with --tiny on a "
                                                 "CPU eager only: there 'graphs' is the slow-to-compile step)")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="transformers baseline on workload (a)")
    p.add_argument("--decode-batches", default=None, help="decode-only batch sizes (default 1,8,32,64,256; "
                                                          "--tiny 1,4; '' for none)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per batch size (30; tiny 4)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and a few short prompts (CPU smoke run)")
    p.add_argument("--model-dir", default=None, help="where to write the model directory (default: a temp dir)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None, help="default 4096 (nano-vllm's); --tiny 256")
    p.add_argument("--kv-cache-memory", default=None, help="default: the engine's (90%% of free memory on CUDA); "
                                                           "--tiny 64MiB")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--hf-batch-size", type=int, default=None, help="transformers batch size (default 250; tiny 4)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_offline.md"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.modes is None:
        args.modes = "eager" if args.tiny and not cuda else "graphs,eager"
    if args.decode_batches is None:
        args.decode_batches = "1,4" if args.tiny else "1,8,32,64,256"
    args.decode_steps = args.decode_steps or (4 if args.tiny else 30)
    args.max_model_len = args.max_model_len or (256 if args.tiny else 4096)
    args.kv_cache_memory = args.kv_cache_memory or ("64MiB" if args.tiny else None)
    args.hf_batch_size = args.hf_batch_size or (4 if args.tiny else 250)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.workload_keys = [w for w in args.workloads.split(",") if w]
    args.mode_list = [m for m in args.modes.split(",") if m]
    args.batch_list = [int(b) for b in args.decode_batches.split(",") if b]
    for w in args.workload_keys:
        if w not in ("a", "b"):
            p.error(f"unknown workload {w!r} (a, b)")
    for m in args.mode_list:
        if m not in ("graphs", "eager"):
            p.error(f"unknown mode {m!r} (graphs, eager)")
    if any(b > args.max_num_seqs for b in args.batch_list):
        p.error(f"decode batch sizes must be <= --max-num-seqs ({args.max_num_seqs})")
    return args


def run_mode(mode: str, args: argparse.Namespace, model_dir: Path, works: dict[str, Workload], report: Report,
             decode: dict[int, dict[str, tuple[float, float]]]) -> None:
    """One engine (CUDA graphs or eager): start-up, the workloads, the decode steps. The engine is gone when this
    returns, so that the next one (or transformers) gets the memory its KV cache took."""
    max_id = ordinary_ids(TINY if args.tiny else QWEN3_0_6B)
    start = time.perf_counter()
    llm = LLM(str(model_dir), dtype=args.dtype, load_format="dummy", enforce_eager=mode == "eager",
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              kv_cache_memory=args.kv_cache_memory, attention_backend=args.attention_backend)
    warm_up(llm, max_id)
    blocks = llm.engine.block_manager
    report.add("setup", [mode, f"{time.perf_counter() - start:.1f}", _decode_step_kind(llm),
                         llm.engine.runner.backend.name, f"{blocks.num_blocks * blocks.block_size:,}"])
    for key, work in works.items():
        run = run_tokenmill(llm, work)
        out_rate = run.output_tokens / run.seconds
        target, target_text = TARGETS[key]
        report.add(key, [f"tokenmill {mode}", str(run.requests), f"{run.exact}/{run.requests}",
                         str(run.output_tokens), f"{run.seconds:.2f}", _rate(out_rate),
                         _rate((run.output_tokens + run.prompt_tokens) / run.seconds), str(run.preemptions),
                         f"{target_text}: {_verdict(out_rate >= target, args.tiny)}"])
    for batch in args.batch_list:
        times = decode_step_seconds(llm, batch, args.decode_steps, max_id)
        decode[batch][mode] = (statistics.median(times), batch / statistics.fmean(times))
        print(f"decode batch {batch} ({mode}): {decode[batch][mode][0] * 1e3:.2f} ms/step", flush=True)
        report.tables["decode"].rows = decode_rows(decode, args.tiny)
        report.write()


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    shape = TINY if args.tiny else QWEN3_0_6B
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    works = {k: w for k, w in build_workloads(args.tiny).items() if k in args.workload_keys}

    tmp = None
    if args.model_dir:
        model_dir = write_model_dir(Path(args.model_dir), shape)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="tokenmill-qwen3-")
        model_dir = write_model_dir(Path(tmp.name), shape)

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    command = "python3 benchmarks/gpu_offline.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = Report(Path(args.out), [
        f"# Offline throughput: {device_name}", "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} · torch {torch.__version__}"
        + (f" (CUDA {torch.version.cuda})" if cuda else "")
        + f" · triton {triton_version} · Python {platform.python_version()}", "",
        f"Model: {'tiny Qwen3 (2 layers, hidden 64)' if args.tiny else 'Qwen3-0.6B shape'}, random weights "
        f"(load_format=\"dummy\"), {args.dtype}, EOS ignored, greedy. tokenmill: max_num_seqs {args.max_num_seqs}, "
        f"max_model_len {args.max_model_len}, attention backend {args.attention_backend}. Every run is timed after "
        "a warm-up generate; tok/s = tokens / wall time of one `generate` of the whole workload.", "",
        f"Command: `{command}`", ""])
    report.table("setup", "Engine start-up", ["mode", "start-up (s)", "decode step", "kernels", "KV cache tokens"])
    for key, work in works.items():
        report.table(key, f"Workload {work.title}",
                     ["system", "requests", "exact max_tokens", "output tokens", "time (s)", "output tok/s",
                      "total tok/s", "preemptions", "target"],
                     note="output tok/s = generated tokens / time (nano-vllm's 'Throughput'); total adds prompts.")
    decode_table = report.table(
        "decode", "Decode step (steady state)",
        ["batch", "graphs ms/step", "eager ms/step", "eager / graphs", "graphs tok/s", "eager tok/s", "target"],
        note=f"Median wall time of {args.decode_steps} `llm.engine.step()` calls, each a decode step of the whole "
             f"batch (32-token prompts; sampling, detokenizing and the host copy included); tok/s = batch / mean "
             f"step time. Target: graphs ≥ {DECODE_TARGET[0]:.0f}x eager at batch ≤ {DECODE_TARGET[1]}.")
    decode: dict[int, dict[str, tuple[float, float]]] = {b: {} for b in args.batch_list}

    for mode in args.mode_list:
        try:
            run_mode(mode, args, model_dir, works, report, decode)
        except Exception as e:  # noqa: BLE001 -- reported; the other modes still run
            report.error(f"tokenmill {mode}", e)
        _free_device_memory()
        if cuda:
            print(f"free GPU memory after {mode}: {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB", flush=True)
    if decode_table.rows:
        print("\n".join(decode_table.lines()), flush=True)

    if args.transformers and "a" in works:
        try:
            run, used = run_transformers(model_dir, works["a"], args.hf_batch_size, device,
                                         resolve_dtype(args.dtype, device))
            report.add("a", [f"transformers {transformers_version()} (sdpa, static batches of {used})",
                             str(run.requests), f"{run.exact}/{run.requests}", str(run.output_tokens),
                             f"{run.seconds:.2f}", _rate(run.output_tokens / run.seconds),
                             _rate((run.output_tokens + run.prompt_tokens) / run.seconds), "—", "—"])
        except Exception as e:  # noqa: BLE001 -- reported, like a failing mode
            report.error("transformers", e)
    report.write()
    print(f"\n{report.text()}\nwrote {report.path}", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    sys.exit(1 if main().errors else 0)
