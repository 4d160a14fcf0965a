"""Decode speed of a Mixture-of-Experts model against two dense models, in one run: one with the MoE's *active*
parameters (its MLP as wide as top_k experts together) and one with its *total* parameters (as wide as all experts).
An MoE should decode at about the speed of the first, since a token reads only its experts' weights; with many
sequences per step the step's tokens touch more of the experts, and its speed moves toward the second.

All three share attention, embedding and the tied output head; weights are random (load_format "dummy": speed
does not depend on values), the tokenizer a word list of the vocabulary's size (benchmarks/gpu_offline.py's, so
this runs where no GGUF reader is installed). Prompts are random token ids, EOS ignored.

    .venv/bin/python benchmarks/moe_bench.py [--streams 1,8] [--device cpu] [--dtype float32]
"""
import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_offline import write_word_tokenizer  # noqa: E402
from benchmarks.machine import cpu_description  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from models.config import ModelConfig  # noqa: E402


def shapes(args) -> dict[str, ModelConfig]:
    """The MoE (Mixtral layout) and its two dense counterparts (Llama layout)."""
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                  num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                  max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  bos_token_id=args.vocab - 3, eos_token_ids=[args.vocab - 1])
    width = args.expert_width
    return {
        f"MoE: {args.experts} experts, top-{args.top_k}": ModelConfig(
            "MixtralForCausalLM", intermediate_size=width, num_experts=args.experts, num_experts_per_tok=args.top_k,
            moe_intermediate_size=width, norm_topk_prob=True, **common),
        "dense, same active parameters": ModelConfig("LlamaForCausalLM", intermediate_size=args.top_k * width,
                                                     **common),
        "dense, same total parameters": ModelConfig("LlamaForCausalLM", intermediate_size=args.experts * width,
                                                    **common),
    }


def parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters."""
    h, layers = cfg.hidden_size, cfg.num_layers
    attention = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * h
    embedding = cfg.vocab_size * h
    if cfg.num_experts:
        expert = 3 * h * cfg.moe_intermediate_size
        total = layers * (attention + cfg.num_experts * expert + h * cfg.num_experts) + embedding
        return total, layers * (attention + cfg.num_experts_per_tok * expert + h * cfg.num_experts) + embedding
    mlp = 3 * h * cfg.intermediate_size
    return layers * (attention + mlp) + embedding, layers * (attention + mlp) + embedding


def write_checkpoint(cfg: ModelConfig, directory: Path) -> Path:
    """config.json and a tokenizer: enough for load_format 'dummy'."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf()))
    return write_word_tokenizer(directory, dict(vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id,
                                                eos_token_id=cfg.eos_token_ids[0],
                                                max_position_embeddings=cfg.max_position_embeddings))


def decode_rate(model: Path, args, streams: int) -> float:
    """Output tokens per second of `streams` sequences decoding together (prefill excluded: the clock starts at
    each sequence's first token, from one extra step that all of them take first)."""
    llm = LLM(str(model), dtype=args.dtype, device=args.device, load_format="dummy", max_model_len=512,
              max_num_seqs=streams, kv_cache_memory="512MiB", enforce_eager=args.enforce_eager)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, args.vocab - 3, (args.prompt_len,), generator=g).tolist() for _ in range(streams)]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    prefill = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=args.output_len + 1, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start - prefill
    del llm
    gc.collect()
    return streams * args.output_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--expert-width", type=int, default=2816, help="each expert's intermediate size")
    parser.add_argument("--streams", default="1,8", help="sequences decoding together, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_cpu.md"))
    args = parser.parse_args()

    streams = [int(s) for s in args.streams.split(",")]
    rates: dict[str, dict[int, float]] = {}
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(shapes(args).items()):
            counts[name] = parameters(cfg)
            model = write_checkpoint(cfg, Path(tmp) / f"model{i}")
            rates[name] = {}
            for n in streams:
                rates[name][n] = decode_rate(model, args, n)
                print(f"{name}: {n} streams {rates[name][n]:.1f} tok/s", flush=True)
    moe, active, total = rates
    device = cpu_description() if args.device == "cpu" else torch.cuda.get_device_name()
    lines = [
        "# Mixture-of-Experts decode speed against dense models", "",
        f"{datetime.date.today()} · {device} · {torch.get_num_threads()} threads · torch {torch.__version__} · "
        f"dtype {args.dtype}{' · eager' if args.enforce_eager else ' · compiled decode step'}", "",
        f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} KV), vocabulary "
        f"{shapes(args)[moe].vocab_size} (tied head); random weights; {args.prompt_len}-token prompts, "
        f"{args.output_len} tokens decoded per sequence, greedy, EOS ignored.", "",
        "| model | total params (M) | active params (M) | " + " | ".join(f"{n} streams tok/s" for n in streams) + " |",
        "|---|---|---|" + "---|" * len(streams),
    ]
    for name in rates:
        lines.append(f"| {name} | {counts[name][0] / 1e6:.0f} | {counts[name][1] / 1e6:.0f} | "
                     + " | ".join(f"{rates[name][n]:.1f}" for n in streams) + " |")
    lines += ["", "| ratio | " + " | ".join(f"{n} streams" for n in streams) + " |", "|---|" + "---|" * len(streams)]
    for other in (active, total):
        lines.append(f"| MoE / {other} | " + " | ".join(f"{rates[moe][n] / rates[other][n]:.2f}x" for n in streams)
                     + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
