"""RL (GRPO): prompts and rules are validated, the rollouts come from the in-process engine whose weights follow
the policy after every optimiser step, resuming repeats the uninterrupted run, and the chain ends in the server."""
import json
import random

import httpx
import pytest
import torch

import training.rl
from engine import LLMEngine, SamplingParams
from models.loading import load_model
from tests.test_dpo import _pairs
from tests.test_sft import _arithmetic
from training.reward import RewardSettings, reward
from training.rl import RLSettings, read_prompts, rl, rollout
from training.rules import sum_rule, sum_sentence_rule
from training.sft import SFTSettings, sft


def _questions(path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": f"What is {rng.randint(0, 9)} plus {rng.randint(0, 9)}?"}) + "\n")
    return str(path)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]


def test_rules_score_the_answer_against_the_question():
    assert sum_rule(3, 4, "3 plus 4 is 7.") == 1.0 and sum_rule(3, 4, "7") == 1.0 and sum_rule(3, 4, "8") == 0.0
    assert sum_rule(3, 4, "I do not know") == 0.0
    assert sum_sentence_rule(3, 4, "3 plus 4 is 7.") == 1.0
    assert sum_sentence_rule(3, 4, "3 plus 4 is 8.") == 0.5 and sum_sentence_rule(3, 4, "7") == 0.5
    assert sum_sentence_rule(3, 4, "4 plus 3 is 8.") == 0.0


@pytest.mark.parametrize("line,rule,words", [
    ('{"prompt": 3}', False, "\"prompt\" must be"),
    ('{"chosen": "a"}', False, "\"prompt\" must be"),
    ('{"prompt": "Tell me a story."}', True, "a plus b"),
])
def test_bad_prompts_are_refused_naming_file_and_line(tmp_path, line, rule, words):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "What is 1 plus 2?"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"q.jsonl:2: .*{words}"):
        read_prompts([str(path)], rule)


def test_settings_are_checked_before_training(toy_pretrained_dir, tmp_path):
    data = [_questions(tmp_path / "q.jsonl", 4, 0)]
    with pytest.raises(ValueError, match="reward_model or rule"):
        rl(RLSettings(model=str(toy_pretrained_dir), data=data, out_dir=str(tmp_path / "a"), progress=False))
    with pytest.raises(ValueError, match="setting rule"):
        rl(RLSettings(model=str(toy_pretrained_dir), data=data, rule="nope", out_dir=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="samples_per_prompt"):
        rl(RLSettings(model=str(toy_pretrained_dir), data=data, rule="sum", samples_per_prompt=1))


@pytest.fixture(scope="module")
def sft_and_reward(toy_pretrained_dir, tmp_path_factory):
    """An SFT model of the toy corpus's model on arithmetic, and a reward model trained from it on pairs."""
    tmp = tmp_path_factory.mktemp("rlhf")
    common = dict(batch_size=8, warmup_steps=3, progress=False)
    sft_dir = sft(SFTSettings(model=str(toy_pretrained_dir), data=[_arithmetic(tmp / "s.jsonl", 200, 0)],
                              out_dir=str(tmp / "sft"), max_steps=20, lr=3e-3, **common))
    pairs = _pairs(tmp / "pairs.jsonl", 64, 0)
    reward_dir = reward(RewardSettings(model=str(sft_dir), data=[pairs], out_dir=str(tmp / "reward"), max_steps=12,
                                       lr=1e-3, **common))
    return sft_dir, reward_dir


def _rl_settings(sft_and_reward, tmp_path, **changes) -> RLSettings:
    sft_dir, reward_dir = sft_and_reward
    settings = dict(model=str(sft_dir), data=[_questions(tmp_path / "q.jsonl", 16, 0)], reward_model=str(reward_dir),
                    rule="sum_sentence", batch_size=2, samples_per_prompt=4, max_new_tokens=8, lr=3e-3,
                    warmup_steps=1, max_steps=2, rollout_eager=True, rollout_kv_memory="16MiB", progress=False)
    return RLSettings(**(settings | changes))


def _policy_greedy(model, tokenizer, eos: set[int], prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy answers by full forward passes of the training model (no engine, no KV cache)."""
    answers = []
    for prompt in prompts:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
                               add_special_tokens=False)
        answer: list[int] = []
        with torch.no_grad():
            while len(answer) < max_tokens and (not answer or answer[-1] not in eos):
                answer.append(int(model.causal_logits(torch.tensor([ids + answer]))[0, -1].argmax()))
        answers.append(answer)
    return answers


@pytest.mark.slow
def test_chain_sft_reward_rl_rollouts_follow_the_policy_and_are_served(sft_and_reward, tmp_path, monkeypatch):
    from tests.conftest import RunningServer
    engines: list[LLMEngine] = []

    class Recorded(LLMEngine):  # the real engine, kept to look at after training
        def __init__(self, config):
            super().__init__(config)
            engines.append(self)

    monkeypatch.setattr(training.rl, "LLMEngine", Recorded)
    held_out = _questions(tmp_path / "val.jsonl", 6, 1)
    out = rl(_rl_settings(sft_and_reward, tmp_path, out_dir=str(tmp_path / "rl"), val_data=[held_out],
                          eval_every=2))
    records = _records(out)
    assert records[0]["step"] == 0 and "val_reward" in records[0] and "val_rule" in records[0]
    for key in ("reward", "reward_model", "rule", "kl", "length", "entropy", "clip_fraction", "rollout_tok_s"):
        assert all(key in r for r in records[1:]), key
    assert records[-1]["kl"] > 0 and records[-1]["val_kl"] != 0  # the policy moved away from the reference

    # the engine that made the rollouts now holds the updated policy: its greedy answers are the saved policy's
    sft_dir, _ = sft_and_reward
    updated, start = load_model(str(out), "float32").model, load_model(str(sft_dir), "float32").model
    tokenizer, eos = engines[0].tokenizer, engines[0].eos_token_ids
    prompts = [f"What is {a} plus {b}?" for a, b in ((1, 2), (7, 5), (0, 9), (4, 4))]
    done = rollout(engines[0], tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                   SamplingParams(temperature=0, max_tokens=8), "check")
    from_engine = [list(answer) for _, answer, _ in done]
    assert from_engine == _policy_greedy(updated, tokenizer, eos, prompts, 8)
    ids = torch.tensor([tokenizer.encode("What is 2 plus 3? 2 plus 3 is 5.")])
    with torch.no_grad():
        engine_logits = engines[0].runner.model.causal_logits(ids)
        torch.testing.assert_close(engine_logits, updated.causal_logits(ids), rtol=1e-4, atol=1e-4)
        assert (engine_logits - start.causal_logits(ids)).abs().max() > 1e-2  # the steps changed the model

    server = RunningServer(str(out), "--served-model-name", "rl", "--kv-cache-memory", "32MiB")
    try:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers, timeout=60, json={
            "model": "rl", "messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.stop()


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(sft_and_reward, tmp_path):
    whole = rl(_rl_settings(sft_and_reward, tmp_path, out_dir=str(tmp_path / "whole")))
    rl(_rl_settings(sft_and_reward, tmp_path, out_dir=str(tmp_path / "cut"), stop_at=1))
    cut = rl(_rl_settings(sft_and_reward, tmp_path, out_dir=str(tmp_path / "cut"), resume=True))
    keys = ("loss", "reward", "kl", "length", "clip_fraction", "grad_norm")
    assert [[r[k] for k in keys] for r in _records(cut) if "loss" in r] == \
        [[r[k] for k in keys] for r in _records(whole) if "loss" in r]


@pytest.mark.slow
def test_two_ddp_processes_each_roll_out_their_own_prompts(sft_and_reward, tmp_path):
    from tests.conftest import torchrun
    settings = _rl_settings(sft_and_reward, tmp_path, out_dir=str(tmp_path / "two"))
    torchrun("rl", {k: getattr(settings, k) for k in ("model", "data", "reward_model", "rule", "batch_size",
                                                      "samples_per_prompt", "max_new_tokens", "lr", "warmup_steps",
                                                      "max_steps", "rollout_eager", "rollout_kv_memory", "out_dir")})
    header = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2 and header["stage"] == "rl"
    records = _records(tmp_path / "two")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["kl"] >= 0 and r["length"] > 0 and r["rollout_tok_s"] > 0 for r in records)
    assert (tmp_path / "two" / "model.safetensors").is_file()
