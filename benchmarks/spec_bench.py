"""Speculative decoding against plain decoding, on the same model in one run: output tokens/s and the ratio, the
acceptance rate, and whether the greedy outputs are the same (they must be).

Workloads (greedy, chat template):
- input-grounded, 1 stream: answers that repeat the prompt (quoting a source, copying code with a small edit,
  repeating a list), where n-gram proposals are often right;
- ordinary chat, 1 stream: benchmarks/chat_prompts.jsonl;
- ordinary chat, 32 streams at once (speculation must then stay out of the way);
- the draft-model row: --draft PATH (a student from `tokenmill train distill` with the teacher's tokenizer) on
  the input-grounded prompts.
Each configuration is warmed up once, then timed twice, alternating with the baseline; the better run counts.

    .venv/bin/python benchmarks/spec_bench.py [--model default] [--k 8] [--draft PATH]
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_description  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ("The Zorblat river is 412 kilometres long and floods every May. Its delta holds three fishing towns: Orb, "
          "Quill and Sarn. The national dish of Zorbland is smoked eel with barley.")
CODE = ("def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n"
        "        subtotal += item.price * item.quantity\n    tax = subtotal * tax_rate\n    return subtotal + tax\n")
GROUNDED = [
    f"Source: {SOURCE}\n\nQuote the source above word for word.",
    f"Repeat this text exactly, nothing else:\n\n{SOURCE}",
    f"Here is some code:\n\n{CODE}\nWrite the same code again, unchanged, in a code block.",
    "Repeat this list exactly: apples, oranges, pears, plums, cherries, grapes, lemons, limes, melons, figs, dates.",
    f"Copy this code and add a comment line at the top:\n\n{CODE}",
    f"Text: {SOURCE}\n\nRewrite the text above, replacing 'Zorblat' with 'Zorbl'.",
]


def chats(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def timed(llm: LLM, conversations: list[list[dict]], params: SamplingParams, concurrent: bool):
    """(output tokens, seconds, outputs): all conversations at once, or one after another."""
    start, outs = time.perf_counter(), []
    if concurrent:
        outs = llm.chat(conversations, params, use_tqdm=False)
    else:
        for conversation in conversations:
            outs += llm.chat([conversation], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - start, outs


def compare(base: LLM, spec: LLM, conversations, params, concurrent: bool) -> dict:
    timed(base, conversations[:2], params, concurrent)  # warm-up (compiled steps, prefix cache alike for both)
    timed(spec, conversations[:2], params, concurrent)
    s = spec.engine.speculator
    before = (s.num_draft_tokens, s.num_accepted_tokens)
    best = {"base": 0.0, "spec": 0.0}
    outputs = {}
    for _ in range(2):
        for name, llm in (("base", base), ("spec", spec)):
            tokens, seconds, outs = timed(llm, conversations, params, concurrent)
            best[name] = max(best[name], tokens / seconds)
            outputs[name] = [o.outputs[0].token_ids for o in outs]
    drafted, accepted = s.num_draft_tokens - before[0], s.num_accepted_tokens - before[1]
    return {"base": best["base"], "spec": best["spec"], "ratio": best["spec"] / best["base"],
            "acceptance": accepted / drafted if drafted else None, "proposed": drafted,
            "same": outputs["base"] == outputs["spec"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--draft", default=None, help="a draft model with the target's tokenizer (a distilled student)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spec_cpu.md"))
    args = ap.parse_args()
    common = dict(max_model_len=2048, kv_cache_memory="1GiB")
    base = LLM(args.model, **common)
    ngram = {"method": "ngram", "num_speculative_tokens": args.k}
    spec = LLM(args.model, speculative_config=ngram, **common)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    chat = [json.loads(line)["messages"] for line in (ROOT / "benchmarks" / "chat_prompts.jsonl").open()]
    rows = [("n-gram, input-grounded, 1 stream", compare(base, spec, chats(GROUNDED), params, False)),
            ("n-gram, ordinary chat, 1 stream", compare(base, spec, chat[:8], params, False)),
            ("n-gram, ordinary chat, 32 streams", compare(base, spec, chat[:32], params, True))]
    if args.draft:
        drafted = LLM(args.model, speculative_config={"method": "draft_model", "model": args.draft,
                                                      "num_speculative_tokens": min(args.k, 4)}, **common)
        rows.append((f"draft model {Path(args.draft).name}, input-grounded, 1 stream",
                     compare(base, drafted, chats(GROUNDED), params, False)))
    lines = [f"# Speculative decoding on the CPU ({datetime.date.today()})", "",
             f"`python benchmarks/spec_bench.py --model {args.model} --k {args.k}"
             f"{' --draft ' + args.draft if args.draft else ''}`; {cpu_description()}; path "
             f"{base.engine.path}; greedy, max_tokens {args.max_tokens}, best of 2 alternating runs.", "",
             "| workload | plain tok/s | speculative tok/s | ratio | acceptance | tokens proposed | same output |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(f"| {name} | {r['base']:.1f} | {r['spec']:.1f} | {r['ratio']:.2f}x | {acceptance} | "
                     f"{r['proposed']} | {'yes' if r['same'] else 'NO'} |")
    if not args.draft:
        lines += ["", "No draft-model row: pass --draft PATH (a student from `tokenmill train distill`)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
