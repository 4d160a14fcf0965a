"""Multi-LoRA serving cost: decode throughput of a batch whose 8 requests each use a different adapter, against the
same batch on the base model, on one engine (--enable-lora) in one run; and the base model on an engine without
LoRA (whose decode step is compiled) beside it. Adapters are random, rank 16 on every adaptable module, as
`tokenmill train sft lora_rank=16 merge_lora=false` writes them; prompts are chat questions, EOS ignored.

    .venv/bin/python benchmarks/lora_bench.py [--model default] [--adapters 8] [--rank 16] [--max-tokens 64]
"""
import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_description  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.lora import LoRARequest  # noqa: E402
from models.loading import load_model  # noqa: E402
from training.lora import DEFAULT_TARGETS, add_lora, save_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_adapters(model: str, count: int, rank: int, root: Path) -> list[Path]:
    loaded = load_model(model, "float32", "cpu")
    add_lora(loaded.model, rank, 2.0 * rank, DEFAULT_TARGETS)
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in loaded.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        paths.append(root / f"adapter{i}")
        paths[-1].mkdir()
        save_adapter(loaded.model, paths[-1], rank, 2.0 * rank, DEFAULT_TARGETS, model)
    return paths


def throughput(llm: LLM, prompts: list[str], params: SamplingParams, loras) -> float:
    llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        messages = [[{"role": "user", "content": p}] for p in prompts]
        outs = llm.generate([llm.get_tokenizer().apply_chat_template(m) for m in messages], params,
                            use_tqdm=False, lora_request=loras)
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_cpu.md"))
    args = ap.parse_args()
    prompts = [json.loads(line)["messages"][0]["content"]
               for line in (ROOT / "benchmarks" / "chat_prompts.jsonl").open()][:args.adapters]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(args.model, args.adapters, args.rank, Path(tmp))
        lora = LLM(args.model, max_model_len=2048, kv_cache_memory="1GiB", enable_lora=True,
                   max_loras=args.adapters, max_lora_rank=args.rank)
        requests = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(paths)]
        rows = [("base model, LoRA engine (eager)", throughput(lora, prompts, params, None)),
                (f"{args.adapters} distinct adapters, LoRA engine", throughput(lora, prompts, params, requests))]
        del lora
        plain = LLM(args.model, max_model_len=2048, kv_cache_memory="1GiB")
        rows.append(("base model, engine without LoRA (compiled decode)", throughput(plain, prompts, params, None)))
        path = plain.engine.path
    base = rows[0][1]
    lines = [f"# Multi-LoRA serving on the CPU ({datetime.date.today()})", "",
             f"`python benchmarks/lora_bench.py --model {args.model} --adapters {args.adapters} --rank {args.rank}`; "
             f"{cpu_description()}; path {path}; {len(prompts)} requests at once, {args.max_tokens} tokens each, "
             "greedy, best of 2.", "", "| batch | output tok/s | vs the base on the LoRA engine |", "|---|---|---|"]
    lines += [f"| {name} | {tps:.1f} | {tps / base:.2f}x |" for name, tps in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
