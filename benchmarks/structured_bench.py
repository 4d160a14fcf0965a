"""What constrained decoding costs: the same chat workload with no constrained request, with a quarter of the
requests constrained (JSON schema or a forced tool call) and with all of them constrained, in one run.

Reports output tok/s of each mix, its ratio to the unconstrained run, and the share of the wall time spent
filling and applying grammar masks. Greedy, so every run makes the same tokens for the requests it shares.

    .venv/bin/python benchmarks/structured_bench.py [--model default] [--num-requests 32] [--max-tokens 96]
"""
import argparse
import datetime
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from engine.sampling_params import StructuredOutputsParams  # noqa: E402
from text.tool_grammar import tool_call_structural_tag  # noqa: E402

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
    "population_millions": {"type": "number"},
    "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3}},
    "required": ["city", "country", "population_millions", "landmarks"]}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Seoul", "Quito"]


def requests(n: int, constrained_every: int | None, max_tokens: int) -> list[tuple[str, list[dict], SamplingParams]]:
    """(kind, conversation, params) per request. The prompts are the same in every mix (half ask for JSON, half
    for the weather with the tool in the prompt); every `constrained_every`-th request gets its constraint (a JSON
    schema, or a forced call of the tool), None: none does."""
    json_schema = StructuredOutputsParams(json=CITY)
    tool = StructuredOutputsParams(structural_tag=tool_call_structural_tag(WEATHER, "get_weather"))
    base = SamplingParams(temperature=0, max_tokens=max_tokens)
    out = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        constrained = bool(constrained_every) and i % constrained_every == 0
        if i % 2 == 0:
            out.append(("json", [{"role": "user", "content": f"Describe {city} as JSON."}],
                        replace(base, structured_outputs=json_schema) if constrained else base))
        else:
            out.append(("tool", [{"role": "user", "content": f"What is the weather in {city}?"}],
                        replace(base, structured_outputs=tool) if constrained else base))
    return out


def run(llm: LLM, batch) -> dict:
    tok = llm.get_tokenizer()
    mask_time = 0.0
    grammars = llm.engine.grammars
    original = grammars.mask

    def timed_mask(logits, matchers):
        nonlocal mask_time
        start = time.perf_counter()
        original(logits, matchers)
        mask_time += time.perf_counter() - start

    steps = 0
    engine_step = llm.engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return engine_step()

    grammars.mask, llm.engine.step = timed_mask, counted_step
    try:
        prompts = [tok.apply_chat_template(conv, tools=WEATHER if kind == "tool" else None) for kind, conv, _ in batch]
        start = time.perf_counter()
        outputs = llm.generate(prompts, [p for _, _, p in batch], use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        grammars.mask, llm.engine.step = original, engine_step
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    constrained = sum(p.structured_outputs is not None for _, _, p in batch)
    return {"constrained": constrained, "tokens": tokens, "steps": steps, "seconds": elapsed, "tok_s": tokens / elapsed,
            "mask_share": mask_time / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured_cpu.md"))
    args = parser.parse_args()
    llm = LLM(args.model, max_model_len=2048)
    run(llm, requests(4, 2, 8))  # warm-up: compiles both grammars once (cached for the measured runs)
    rows = [(label, min((run(llm, requests(args.num_requests, every, args.max_tokens)) for _ in range(2)),
                        key=lambda r: r["seconds"]))
            for label, every in (("none constrained", None), ("1 in 3 constrained", 3), ("all constrained", 1))]
    base = rows[0][1]["tok_s"]
    lines = [f"# Constrained decoding cost ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "",
             f"`python benchmarks/structured_bench.py --num-requests {args.num_requests} "
             f"--max-tokens {args.max_tokens}`: {args.num_requests} greedy chat requests in one batch, the same "
             "prompts in every mix (half ask for JSON, half for the weather with a tool in the prompt); a "
             "constrained one gets a JSON schema or a forced tool call. Each mix runs twice; the faster run is "
             "shown (the prompts are in the prefix cache by then, so the runs are nearly all decode steps). "
             "Constrained answers end when their JSON does, so output lengths differ between mixes: ms per "
             "engine step and the mask's share of the time (filling xgrammar's bitmasks and applying them) are "
             "the direct costs.", "",
             "| mix | constrained | output tokens | steps | ms / step | seconds | tok/s | vs none | mask time share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['constrained']} | {r['tokens']} | {r['steps']} | "
                     f"{1000 * r['seconds'] / r['steps']:.1f} | {r['seconds']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base:.2f}x | {100 * r['mask_share']:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
