"""Stage `rl`: on-policy reinforcement learning with GRPO (group-relative policy optimisation) from an SFT
checkpoint.

Each step: the step's prompts (JSONL {"prompt": text or [messages]}, the DPO files work as they are) go to
tokenmill's own LLMEngine in this process, which samples `samples_per_prompt` answers to each; every answer gets
a reward (the reward model's score, a verifiable rule from training/rules.py, or both weighted); an answer's
advantage is its reward normalised within its prompt's group (no critic); the policy then takes `ppo_epochs`
optimiser steps on the clipped-ratio objective plus a KL penalty against the frozen starting model, and the
engine's weights are overwritten in place with the policy's (no checkpoint round trip; its prefix cache dropped).
Under torchrun each process rolls out its own prompts with its own engine; DDP averages the gradients.

Why GRPO and not PPO: rewards here are per answer (a score, a rule), so a value head would learn one number per
prompt that the group's mean already gives, at the cost of a second network to train and tune; and sampling n
answers per prompt is what the engine does cheaply (they share the prompt's KV blocks)."""
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from models.reward import load_reward_model
from training.data import SampleOrder, encode_conversation, expand, read_jsonl
from training.dpo import read_prompt, token_logprobs
from training.lora import merge_lora
from training.rules import check_rule, operands
from training.sft import FinetuneSettings, saver, start_model
from training.trainer import Forward, build_optimizer, distributed, lr_at, mixed_precision, resume, save_state


@dataclass
class RLSettings(FinetuneSettings):
    out_dir: str = "out/rl"
    model: str = "out/sft"
    batch_size: int = 8  # prompts per step and process; grad_accum splits their answers into micro-batches
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 5
    max_steps: int = 100
    eval_every: int = 25
    reward_model: str = ""  # a `tokenmill train reward` directory; "" for none
    reward_model_weight: float = 1.0
    rule: str = ""  # a verifiable rule of training/rules.py ("sum", "sum_sentence"); "" for none
    rule_weight: float = 1.0
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    ppo_epochs: int = 2  # optimiser steps on each batch of rollouts (1: plain on-policy, the ratio stays 1)
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    rollout_dtype: str = "float32"  # the engine's dtype ("auto" lets it time its paths)
    rollout_kv_memory: str = "256MiB"
    rollout_eager: bool = False  # no compiled decode step (saves its compile in short runs)


def read_prompts(patterns: list[str], need_operands: bool) -> list[tuple[str, list[dict]]]:
    out = []
    for path in expand(patterns):
        for number, row in read_jsonl(path):
            where = f"{path}:{number}"
            prompt = read_prompt(row, where)
            if need_operands and operands(prompt[-1]["content"]) is None:
                raise ValueError(f"{where}: the rule needs a question of the form \"a plus b\"")
            out.append((where, prompt))
    return out


class Rewards:
    """The weighted sum of the reward model's score and the rule's; each part is kept for the log."""

    def __init__(self, s: RLSettings, tokenizer):
        if not s.reward_model and not s.rule:
            raise ValueError("setting reward_model or rule: RL needs a reward (a reward model, a rule, or both)")
        self.s, self.tokenizer = s, tokenizer
        self.model = load_reward_model(s.reward_model)[0] if s.reward_model else None
        self.rule = check_rule(s.rule) if s.rule else None

    def __call__(self, prompts: list[list[dict]], answers: list[str]) -> dict[str, torch.Tensor]:
        parts, total = {}, torch.zeros(len(answers))
        if self.model is not None:
            rows = [encode_conversation(self.tokenizer, p + [{"role": "assistant", "content": a}], 10**6)[0]
                    for p, a in zip(prompts, answers)]
            parts["reward_model"] = self.model.score_ids(rows)
            total += self.s.reward_model_weight * parts["reward_model"]
        if self.rule is not None:
            parts["rule"] = torch.tensor([self.rule(*operands(p[-1]["content"]), a) for p, a in zip(prompts, answers)])
            total += self.s.rule_weight * parts["rule"]
        return {"reward": total, **parts}


def policy_weights(policy: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        policy = copy.deepcopy(policy)
        merge_lora(policy)
    return policy.hf_state_dict()


def rollout(engine: LLMEngine, tokenizer, prompts, params: SamplingParams, tag: str):
    """(prompt ids, answer token ids, answer text) for each prompt's params.n samples, in order."""
    ids = []
    for i, messages in enumerate(prompts):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids.append(tokenizer.encode(text, add_special_tokens=False))
        engine.add_request(f"{tag}-{i}", text, params, prompt_token_ids=ids[-1])
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.error is not None:
                raise RuntimeError(f"rollout {o.request_id} failed: {o.error}")
            if o.finished:
                done[o.request_id] = o
    return [(ids[i], o.token_ids, o.text) for i in range(len(prompts)) for o in done[f"{tag}-{i}"].outputs]


def rl(s: RLSettings) -> Path:
    if s.samples_per_prompt < 2:
        raise ValueError("setting samples_per_prompt: GRPO compares answers within a prompt's group; give 2 or more")
    loaded, facts = start_model(s, "prompts")
    world, rank = distributed()
    policy, tokenizer = loaded.model, loaded.tokenizer
    reference = copy.deepcopy(policy).requires_grad_(False).eval()  # the starting model (LoRA: zero adapters)
    prompts = read_prompts(s.data, s.rule != "")
    val = read_prompts(s.val_data, s.rule != "") if s.val_data else []
    rewards = Rewards(s, tokenizer)
    engine = LLMEngine(EngineConfig(model=s.model, dtype=s.rollout_dtype, device="cpu", seed=s.seed,
                                    kv_cache_memory=s.rollout_kv_memory, enforce_eager=s.rollout_eager))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(s, trainable)
    step = resume(s, policy, optimizer)
    engine.update_weights(policy_weights(policy, s.lora_rank > 0))
    call = torch.nn.parallel.DistributedDataParallel(Forward(policy, policy.causal_logits)) if world > 1 \
        else policy.causal_logits
    pad, order, n = tokenizer.eos_token_id or 0, SampleOrder(len(prompts), s.seed), s.samples_per_prompt

    def evaluate() -> dict:
        """Held-out prompts: greedy answers' mean reward (and parts), and KL(policy || reference) per answer
        estimated on one sampled answer per prompt."""
        if not val:
            return {}
        batch = [m for _, m in val]
        greedy = rollout(engine, tokenizer, batch, SamplingParams(temperature=0, max_tokens=s.max_new_tokens), "val")
        scores = rewards(batch, [text for _, _, text in greedy])
        sampled = rollout(engine, tokenizer, batch, SamplingParams(temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k, max_tokens=s.max_new_tokens, seed=s.seed), "val-kl")
        rows = [(p + a, [-100] * len(p) + a) for p, a, _ in sampled]
        kl = []
        for i in range(0, len(rows), s.batch_size * n):
            lp, mask, _ = token_logprobs(policy.causal_logits, rows[i:i + s.batch_size * n], pad)
            ref, _, _ = token_logprobs(reference.causal_logits, rows[i:i + s.batch_size * n], pad)
            kl.append(((lp - ref) * mask).sum(-1))
        return {f"val_{k}": float(v.mean()) for k, v in scores.items()} | {
            "val_kl": float(torch.cat(kl).mean()), "val_length": sum(len(a) for _, a, _ in greedy) / len(greedy)}

    out = Path(s.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "log.jsonl", "a" if step else "w")
        log_file.write(json.dumps({"settings": asdict(s), "stage": "rl", **facts, "prompts": len(prompts),
                                   "val_prompts": len(val), "world_size": world}) + "\n")

    def log(record: dict, with_eval: bool) -> None:
        if with_eval:
            policy.eval()
            with torch.no_grad():
                record |= evaluate()
            policy.train()
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    if step == 0 and rank == 0 and val:  # the starting point, to measure what training changed
        log({"step": 0}, True)
    end = min(s.max_steps, s.stop_at) if s.stop_at else s.max_steps
    save = saver(s, loaded)
    while step < end:
        start = time.perf_counter()
        # 1. rollouts: this process's prompts of the step, n answers each, seeded by (seed, step, prompt)
        batch = [prompts[order((step * world + rank) * s.batch_size + i)][1] for i in range(s.batch_size)]
        params = SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                max_tokens=s.max_new_tokens, seed=(s.seed * 1_000_003 + step) * 1009 + rank)
        done = rollout(engine, tokenizer, batch, params, f"step{step}")
        rollout_s = time.perf_counter() - start
        # 2. rewards, and advantages normalised within each prompt's group of n
        scored = rewards([m for m in batch for _ in range(n)], [text for _, _, text in done])
        grouped = scored["reward"].view(-1, n)
        advantage = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        rows = [(p + a, [-100] * len(p) + a) for p, a, _ in done]
        size = -(-len(rows) // s.grad_accum)
        micro = [range(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]
        with torch.no_grad(), mixed_precision():
            old = [token_logprobs(policy.causal_logits, [rows[i] for i in m], pad)[0] for m in micro]
            ref = [token_logprobs(reference.causal_logits, [rows[i] for i in m], pad)[0] for m in micro]
        tokens = sum(len(a) for _, a, _ in done)
        # 3. ppo_epochs optimiser steps on the clipped objective + KL penalty, token-level mean over the batch
        stats = torch.zeros(4)  # loss, kl, entropy, clipped (token sums)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        for _ in range(s.ppo_epochs):
            for j, m in enumerate(micro):
                sync = call.no_sync() if world > 1 and j < len(micro) - 1 else torch.enable_grad()
                with sync, mixed_precision():
                    new, mask, entropy = token_logprobs(call, [rows[i] for i in m], pad, entropy=True)
                    ratio = torch.exp(new - old[j])
                    adv = advantage[list(m)].unsqueeze(1)
                    objective = torch.min(ratio * adv, ratio.clamp(1 - s.clip_eps, 1 + s.clip_eps) * adv)
                    kl = torch.exp(ref[j] - new) - (ref[j] - new) - 1  # k3: unbiased, never negative
                    loss = ((-objective + s.kl_coef * kl) * mask).sum() / tokens
                loss.backward()
                stats += torch.stack([loss.detach() * tokens, (kl.detach() * mask).sum(), (entropy * mask).sum(),
                                      (((ratio - 1).abs() > s.clip_eps) & mask).sum()])
            norm = torch.nn.utils.clip_grad_norm_(trainable, s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        engine.update_weights(policy_weights(policy, s.lora_rank > 0))
        # 4. the step's record, averaged over processes
        means = torch.cat([stats / (tokens * s.ppo_epochs), torch.tensor([tokens / len(done), tokens / rollout_s]),
                           torch.stack([v.mean() for v in scored.values()])])
        if world > 1:
            dist.all_reduce(means)
            means /= world
        names = ["loss", "kl", "entropy", "clip_fraction", "length", "rollout_tok_s", *scored]
        record = {"step": step, "lr": lr_at(step - 1, s), "grad_norm": float(norm),
                  "seconds": time.perf_counter() - start} | dict(zip(names, means.tolist()))
        if rank == 0:
            log(record, step % s.eval_every == 0 or step == s.max_steps)
            if step % s.save_every == 0 or step == end:
                save(out)
                save_state(out, policy, optimizer, step)
    if world > 1:
        dist.barrier()
    return Path(s.out_dir)
