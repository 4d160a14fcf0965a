"""Every training stage at demo size on the `make data` corpus, with the effect each one should have measured
against its baseline in the same run; writes benchmarks/results/training.md.

    .venv/bin/python benchmarks/training_bench.py --data data --out-dir out/demo [--scale 1.0]

1. tokenizer + pretrain: validation perplexity on held-out text (a play, a novel, the Python tutorial) vs a
   unigram model of the training text; then a Mixture-of-Experts of the same active size (same layers, width and
   heads; 4 experts of half the dense MLP's width, top-2, so a token runs as many MLP weights as in the dense
   model) trained the same steps: its validation perplexity vs the dense model's, with total and active
   parameters.
2. sft on chatterbot Q/A (full): held-out assistant-token loss before and after; it also teaches the chat format.
3. sft on arithmetic from that model, full vs LoRA (< 1% of the parameters trainable): held-out arithmetic loss.
4. dpo from the SFT model, on pairs whose chosen answer restates the sum in a sentence and whose rejected one is
   the bare number: held-out preference and the task score (greedy answers to questions never asked in training
   that keep the rule), SFT model vs DPO model; the share of right sums is shown too.
5. reward and rl from the SFT model (benchmarks/rlhf_bench.py): the reward model's held-out pairwise accuracy,
   and GRPO's effect on held-out questions, two seeds (run alone, rlhf_bench.py writes results/rlhf.md).
6. distill: a smaller student trained against the pretrained teacher vs the same student on hard labels only,
   equal steps: validation loss on the held-out text.
"""
import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import rlhf_bench  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from training.distill import DistillSettings, distill  # noqa: E402
from training.dpo import DPOSettings, dpo  # noqa: E402
from training.pretrain import PretrainSettings, pretrain  # noqa: E402
from training.sft import SFTSettings, sft  # noqa: E402
from training.tok_train import TokenizerSettings, train_tokenizer  # noqa: E402

MODEL = dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=688, seq_len=128)
DPO_BETA, DPO_NLL = 0.1, 1.0  # nll_weight: DPO alone drifted off the chosen format (see the results' notes)
# top-2 rather than top-1 at full width: Mixtral renormalizes the chosen experts' weights, so a top-1 router's weight
# is always 1 and it would learn from the load-balancing loss alone
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=MODEL["intermediate_size"] // 2,
           router_aux_loss_coef=0.01)
STUDENT = dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=344, seq_len=128)


def records(out: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return lines[0], lines[1:]


def first_last(out: Path, key: str) -> tuple[float, float]:
    values = [r[key] for r in records(out)[1] if key in r]
    return values[0], values[-1]


def millions(header: dict, key: str) -> str:
    return f"{header[key] / 1e6:.2f}M" if key in header else "?"  # a reused run from before the count was logged


def task_score(model_dir: Path, val_file: Path) -> tuple[float, float]:
    """(share of greedy answers that keep the rule "a plus b is N.", share whose last number is the right sum)
    over the held-out questions."""
    rows = [json.loads(line) for line in val_file.read_text().splitlines()]
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="256MiB")
    outs = llm.chat([[{"role": "user", "content": r["prompt"]}] for r in rows],
                    SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    kept = right = 0
    for row, out in zip(rows, outs):
        a, b = map(int, re.findall(r"\d+", row["prompt"])[:2])
        text = out.outputs[0].text.strip()
        kept += re.fullmatch(rf"{a} plus {b} is -?\d+\.", text) is not None
        numbers = re.findall(r"-?\d+", text)
        right += bool(numbers) and numbers[-1] == str(a + b)
    return kept / len(rows), right / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data")
    parser.add_argument("--out-dir", default="out/demo")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's step count")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "training.md"))
    parser.add_argument("--reuse", action="store_true", help="keep the tokenizer, pretrained model and distilled "
                        "students already in --out-dir (the slow stages) and rerun the fine-tuning ones")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out_dir)
    steps = lambda n: max(2, int(n * args.scale))  # noqa: E731
    quiet = dict(progress=False)
    timings = {}
    text = [str(data / "text" / "*")]
    held_out = [str(data / "text_val" / "*")]

    start = time.perf_counter()
    pre, pre_moe = out / "pretrain", out / "pretrain_moe"
    pretraining = dict(data=text, val_data=held_out, tokenizer=str(out / "tokenizer"), max_steps=steps(600),
                       batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=30, eval_every=steps(600), eval_batches=16,
                       **MODEL, **quiet)
    if not (args.reuse and (pre / "model.safetensors").is_file()):
        train_tokenizer(TokenizerSettings(data=text, out_dir=str(out / "tokenizer"), vocab_size=4096))
        pretrain(PretrainSettings(out_dir=str(pre), **pretraining))
        timings["tokenizer + pretrain"] = time.perf_counter() - start
    start = time.perf_counter()
    if not (args.reuse and (pre_moe / "model.safetensors").is_file()):
        pretrain(PretrainSettings(out_dir=str(pre_moe), **pretraining, **MOE))
        timings["pretrain (MoE)"] = time.perf_counter() - start
    header, _ = records(pre)
    _, pre_val = first_last(pre, "val_ppl")
    moe_header, _ = records(pre_moe)
    _, moe_val = first_last(pre_moe, "val_ppl")
    _, moe_aux = first_last(pre_moe, "aux_loss")

    sft_dir = data / "sft"
    start = time.perf_counter()
    chat = sft(SFTSettings(model=str(pre), data=[str(sft_dir / "chat_train.jsonl")],
                           val_data=[str(sft_dir / "chat_val.jsonl")], out_dir=str(out / "sft_chat"),
                           max_steps=steps(300), batch_size=16, lr=1e-3, min_lr=1e-4, eval_every=steps(300),
                           eval_batches=32, max_len=128, **quiet))
    timings["sft (chat)"] = time.perf_counter() - start
    arith = dict(data=[str(sft_dir / "arith_train.jsonl")], val_data=[str(sft_dir / "arith_val.jsonl")],
                 max_steps=steps(300), batch_size=16, eval_every=steps(300), eval_batches=32, max_len=128, **quiet)
    start = time.perf_counter()
    full = sft(SFTSettings(model=str(chat), out_dir=str(out / "sft"), lr=1e-3, min_lr=1e-4, **arith))
    timings["sft (arithmetic, full)"] = time.perf_counter() - start
    start = time.perf_counter()
    lora = sft(SFTSettings(model=str(chat), out_dir=str(out / "sft_lora"), lr=1e-2, min_lr=1e-3, lora_rank=2,
                           lora_alpha=4.0, **arith))
    timings["sft (arithmetic, LoRA)"] = time.perf_counter() - start
    lora_header, _ = records(lora)

    dpo_val = data / "dpo" / "val.jsonl"
    start = time.perf_counter()
    pref = dpo(DPOSettings(model=str(full), data=[str(data / "dpo" / "train.jsonl")], val_data=[str(dpo_val)],
                           out_dir=str(out / "dpo"), max_steps=steps(200), batch_size=16, lr=1e-4, min_lr=1e-5,
                           beta=DPO_BETA, nll_weight=DPO_NLL, eval_every=steps(200), max_len=128, **quiet))
    timings["dpo"] = time.perf_counter() - start
    scores = {"SFT model": task_score(full, dpo_val), "DPO model": task_score(pref, dpo_val)}

    rlhf_rows, rlhf_timings = rlhf_bench.run(data, full, out, args.scale)
    timings.update(rlhf_timings)

    start = time.perf_counter()
    students = {}
    for label, alpha in (("hard labels only", 0.0), ("distilled (alpha 0.5, T 2)", 0.5)):
        students[label] = out / f"distill_{alpha}"
        if args.reuse and (students[label] / "model.safetensors").is_file():
            continue
        distill(DistillSettings(
            teacher=str(pre), tokenizer=str(pre), data=text, val_data=held_out, out_dir=str(out / f"distill_{alpha}"),
            alpha=alpha, temperature=2.0, max_steps=steps(300), batch_size=16, lr=3e-3, min_lr=3e-4,
            warmup_steps=20, eval_every=steps(300), eval_batches=16, **STUDENT, **quiet))
    timings["distill (2 students)"] = time.perf_counter() - start

    chat_before, chat_after = first_last(chat, "val_loss")
    sft_before, sft_after = first_last(full, "val_loss")
    lora_before, lora_after = first_last(lora, "val_loss")
    lines = [
        f"# Training stages at demo size ({datetime.date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "",
        f"`python benchmarks/training_bench.py --data {args.data} --out-dir {args.out_dir} --scale {args.scale}` "
        "on the `make data` corpus (Shakespeare, the KJV, Austen and the Python docs, with the last play, the last "
        "novel and the Python tutorial held out; chatterbot and Python FAQ Q/A and arithmetic for SFT; arithmetic "
        "preference pairs whose chosen answer restates the sum in a sentence and whose rejected one is the bare "
        "number).", "",
        "| check | baseline | result |", "|---|---|---|",
        f"| pretrain ({MODEL['num_layers']} layers, {MODEL['hidden_size']} wide, {steps(600)} steps): validation "
        f"perplexity on the held-out text | unigram {header['unigram_val_ppl']:.1f} | {pre_val:.1f} |",
        f"| pretrain MoE, same shape and steps ({MOE['num_experts']} experts {MOE['moe_intermediate_size']} wide, "
        f"top-{MOE['num_experts_per_tok']}, aux coef {MOE['router_aux_loss_coef']}; "
        f"{millions(moe_header, 'active_parameters')} active of {millions(moe_header, 'parameters')} parameters, "
        f"dense {millions(header, 'parameters')}; last aux loss {moe_aux:.3f}, "
        f"{MOE['num_experts_per_tok']} at balance): validation perplexity | dense {pre_val:.1f} | {moe_val:.1f} |",
        f"| sft on chatterbot Q/A (full, {steps(300)} steps): held-out assistant-token loss | before "
        f"{chat_before:.3f} | {chat_after:.3f} |",
        f"| sft on arithmetic from that model (full, {steps(300)} steps): held-out assistant-token loss | before "
        f"{sft_before:.3f} | {sft_after:.3f} |",
        f"| the same with LoRA r=2 ({100 * lora_header['trainable_fraction']:.2f}% of parameters trainable) | "
        f"full SFT {sft_after:.3f} | {lora_after:.3f} |",
    ]
    dpo_first, dpo_last = records(pref)[1][0], [r for r in records(pref)[1] if "val_prefers_chosen" in r][-1]
    lines += [
        f"| dpo ({steps(200)} steps, beta {DPO_BETA}, nll_weight {DPO_NLL}): held-out pairs where the model "
        "prefers the chosen answer | "
        f"SFT model {dpo_first['val_prefers_chosen']:.3f} | {dpo_last['val_prefers_chosen']:.3f} (reward "
        f"accuracy {dpo_last['val_reward_accuracy']:.3f}) |",
        f"| dpo: task score (greedy answers that restate the sum, {sum(1 for _ in open(dpo_val))} held-out "
        f"questions) | SFT model {scores['SFT model'][0]:.3f} | {scores['DPO model'][0]:.3f} |",
        f"| dpo: the same answers' sums that are right | SFT model {scores['SFT model'][1]:.3f} | "
        f"{scores['DPO model'][1]:.3f} |",
    ]
    lines += rlhf_rows
    hard = first_last(students["hard labels only"], "val_loss")[1]
    soft = first_last(students["distilled (alpha 0.5, T 2)"], "val_loss")[1]
    lines += [f"| distill ({STUDENT['num_layers']} layers, {STUDENT['hidden_size']} wide, {steps(300)} steps): "
              f"validation loss on the held-out text | hard labels only {hard:.3f} | {soft:.3f} |", "",
              "Time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "."]
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    Path(args.results).write_text(text_out)


if __name__ == "__main__":
    main()
