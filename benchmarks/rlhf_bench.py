"""RLHF at demo size from an SFT model: a reward model on the arithmetic preference pairs, then GRPO with the
engine's rollouts, two seeds; writes benchmarks/results/rlhf.md. `make train-demo` runs it after sft.

    .venv/bin/python benchmarks/rlhf_bench.py --data data --sft out/demo/sft --out-dir out/demo [--scale 1.0]

1. reward: held-out pairwise accuracy (chance 0.5; and the untrained head's) and margin.
2. rl from the SFT model, reward = the reward model's score + the verifiable rule `sum_sentence` (1: "a plus b is
   N." with N right; 0.5: the sentence with a wrong N, or the right N in other words): on the 100 held-out
   questions (never asked in any training stage), the greedy answers' mean reward-model score and rule score
   before and after, for two seeds, with KL(policy || SFT model) per answer.
3. rollout throughput: the engine's sampling of one step's batch (prompts x n answers) vs transformers.generate on
   the same batch and model, float32, same machine, same run.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_description  # noqa: E402
from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from training.reward import RewardSettings, reward  # noqa: E402
from training.rl import RLSettings, read_prompts, rl, rollout  # noqa: E402

RL = dict(reward_model_weight=0.1, rule="sum_sentence", rule_weight=1.0, samples_per_prompt=8, batch_size=8,
          max_new_tokens=16, lr=2e-5, min_lr=2e-6, kl_coef=0.04, ppo_epochs=2, temperature=1.0)
REPEATS = 3


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]


def rollout_throughput(model_dir: Path, prompts: list[list[dict]], n: int, max_tokens: int) -> tuple[float, float]:
    """(engine tok/s, transformers.generate tok/s) sampling n answers to each prompt, float32."""
    import transformers
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory="256MiB"))
    tokenizer = engine.tokenizer
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    rollout(engine, tokenizer, prompts[:2], params, "warm")  # the compiled decode step's first call compiles
    ours = 0.0
    for repeat in range(REPEATS):  # the best of a few: these machines are shared and noisy
        start = time.perf_counter()
        done = rollout(engine, tokenizer, prompts, params, f"timed{repeat}")
        ours = max(ours, sum(len(a) for _, a, _ in done) / (time.perf_counter() - start))

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [tokenizer.encode(tokenizer.apply_chat_template(p), add_special_tokens=False) for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.eos_token_id
    batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])  # left-padded
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    eos = sorted(engine.eos_token_ids)
    with torch.no_grad():
        hf.generate(batch[:2], attention_mask=mask[:2], do_sample=True, max_new_tokens=2, pad_token_id=pad)
        theirs = 0.0
        for _ in range(REPEATS):
            start = time.perf_counter()
            out = hf.generate(batch, attention_mask=mask, do_sample=True, num_return_sequences=n,
                              max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=pad, top_k=0)
            seconds = time.perf_counter() - start
            # tokens up to and including each answer's first EOS (after it, generate pads), as the engine counts
            ended = torch.isin(out[:, width:], torch.tensor(eos))
            lengths = [int(row.nonzero()[0]) + 1 if row.any() else len(row) for row in ended]
            theirs = max(theirs, sum(lengths) / seconds)
    return ours, theirs


def run(data: Path, sft_dir: Path, out: Path, scale: float = 1.0, seeds: tuple[int, ...] = (1, 2),
        reuse: bool = False) -> tuple[list[str], dict]:
    """The table rows (markdown) and the seconds per stage; with reuse, the reward model and RL runs already in
    `out` are read rather than trained again."""
    steps = lambda k: max(2, int(k * scale))  # noqa: E731
    quiet = dict(progress=False)
    pairs, held_out = data / "dpo" / "train.jsonl", data / "dpo" / "val.jsonl"
    timings = {}
    rm = out / "reward"
    if not (reuse and (rm / "model.safetensors").is_file()):
        start = time.perf_counter()
        reward(RewardSettings(model=str(sft_dir), data=[str(pairs)], val_data=[str(held_out)], out_dir=str(rm),
                              max_steps=steps(100), batch_size=16, lr=1e-4, min_lr=1e-5, eval_every=steps(100),
                              max_len=128, **quiet))
        timings["reward"] = time.perf_counter() - start
    rm_first, rm_last = records(rm)[0], records(rm)[-1]
    runs = {}
    for seed in seeds:
        runs[seed] = out / f"rl_seed{seed}"
        if reuse and (runs[seed] / "model.safetensors").is_file():
            continue
        start = time.perf_counter()
        rl(RLSettings(model=str(sft_dir), data=[str(pairs)], val_data=[str(held_out)], reward_model=str(rm),
                      out_dir=str(runs[seed]), seed=seed, max_steps=steps(60), eval_every=steps(60),
                      save_every=steps(60), **RL, **quiet))
        timings[f"rl (seed {seed})"] = time.perf_counter() - start
    prompts = [m for _, m in read_prompts([str(pairs)], False)[:RL["batch_size"]]]
    ours, theirs = rollout_throughput(sft_dir, prompts, RL["samples_per_prompt"], RL["max_new_tokens"])

    first = {seed: records(o)[0] for seed, o in runs.items()}
    last = {seed: [r for r in records(o) if "val_reward" in r][-1] for seed, o in runs.items()}
    train_last = {seed: [r for r in records(o) if "kl" in r][-1] for seed, o in runs.items()}

    def per_seed(values: dict) -> str:
        return " / ".join(f"{v:.3f}" for v in values.values())

    def spread(key: str) -> float:
        return max(r[key] for r in last.values()) - min(r[key] for r in last.values())

    n_val = sum(1 for _ in open(held_out))
    rows = [
        f"| reward model ({steps(100)} steps, Bradley-Terry, from the SFT model): held-out pairwise accuracy, "
        f"{rm_last.get('val_pairs', n_val)} pairs | chance 0.5; untrained head {rm_first['val_accuracy']:.3f} | "
        f"{rm_last['val_accuracy']:.3f} (margin {rm_last['val_margin']:.2f}) |",
        f"| rl (GRPO, {steps(60)} steps x {RL['batch_size']} prompts x {RL['samples_per_prompt']} answers, reward "
        f"{RL['reward_model_weight']} x RM + rule {RL['rule']}, KL coef {RL['kl_coef']}), seeds "
        f"{' / '.join(map(str, seeds))}: held-out greedy answers' mean reward-model score | SFT model "
        f"{per_seed({s: r['val_reward_model'] for s, r in first.items()})} | "
        f"{per_seed({s: r['val_reward_model'] for s, r in last.items()})} "
        f"(seed spread {spread('val_reward_model'):.3f}) |",
        f"| rl: held-out verifiable score (rule {RL['rule']}, {n_val} questions never asked in training) | SFT model "
        f"{per_seed({s: r['val_rule'] for s, r in first.items()})} | "
        f"{per_seed({s: r['val_rule'] for s, r in last.items()})} (seed spread {spread('val_rule'):.3f}) |",
        f"| rl: KL(policy ∥ SFT model) per held-out answer (sampled), nats; last step's per-token KL | 0 | "
        f"{per_seed({s: r['val_kl'] for s, r in last.items()})}; "
        f"{per_seed({s: r['kl'] for s, r in train_last.items()})} |",
        f"| rl rollouts: {RL['batch_size']} prompts x {RL['samples_per_prompt']} sampled answers, up to "
        f"{RL['max_new_tokens']} tokens, float32, output tok/s | transformers.generate {theirs:.0f} | "
        f"engine {ours:.0f} ({ours / theirs:.1f}x) |",
    ]
    return rows, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data")
    parser.add_argument("--sft", default="out/demo/sft")
    parser.add_argument("--out-dir", default="out/demo")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "rlhf.md"))
    parser.add_argument("--reuse", action="store_true", help="read the reward model and RL runs already in --out-dir "
                        "(from a run of the same settings) and measure the rollout throughput again")
    args = parser.parse_args()
    rows, timings = run(Path(args.data), Path(args.sft), Path(args.out_dir), args.scale, reuse=args.reuse)
    lines = [f"# RLHF at demo size ({datetime.date.today()}, {cpu_description()}, {torch.get_num_threads()} threads)",
             "", f"`python benchmarks/rlhf_bench.py --data {args.data} --sft {args.sft} --out-dir {args.out_dir} "
             f"--scale {args.scale}{' --reuse' if args.reuse else ''}`", "", "| check | baseline | result |", "|---|---|---|", *rows, "",
             "Time per stage (s): " + (", ".join(f"{k} {v:.0f}" for k, v in timings.items()) or
                                       "reused from an earlier run of the same settings") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
