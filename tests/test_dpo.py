"""DPO: pairs are validated by file and line, the loss starts at log 2 with the reference equal to the policy,
and training moves the policy's preference towards the chosen answers; then the whole chain ends in the server."""
import json
import random

import httpx
import pytest
import torch

from training.dpo import DPOSettings, dpo, read_pairs
from training.lora import MergeSettings, merge_adapter
from training.sft import SFTSettings, sft


def _pairs(path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                                "rejected": f"I do not know what {a} plus {b} is."}) + "\n")
    return str(path)


@pytest.mark.parametrize("line,words", [
    ('{"prompt": "q", "chosen": "a"}', "\"chosen\" and \"rejected\""),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "\"prompt\" must be"),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "the same answer"),
])
def test_bad_pairs_are_refused_naming_file_and_line(tmp_path, line, words):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"p.jsonl:2: .*{words}"):
        read_pairs([str(path)])


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]


@pytest.mark.slow
def test_chain_tokenizer_pretrain_sft_dpo_lora_merge_is_served(toy_pretrained_dir, tmp_path):
    import transformers

    from engine import LLM
    from tests.conftest import RunningServer
    from tests.test_sft import _arithmetic
    common = dict(batch_size=8, warmup_steps=3, progress=False)
    sft_dir = sft(SFTSettings(model=str(toy_pretrained_dir), data=[_arithmetic(tmp_path / "s.jsonl", 200, 0)],
                              out_dir=str(tmp_path / "sft"), max_steps=20, lr=3e-3, **common))
    train = _pairs(tmp_path / "train.jsonl", 64, 0)
    # lr 3e-3: at 1e-2 the 20 LoRA steps sat on the edge of divergence, so that a one-line edit of the README (part
    # of the toy corpus) moved the final val_loss between 0.0002 and 3.2; at 3e-3 it ends at 0.02-0.29 on all four
    # corpora tried
    dpo_dir = dpo(DPOSettings(model=str(sft_dir), data=[train], val_data=[train], out_dir=str(tmp_path / "dpo"),
                              max_steps=20, eval_every=20, lr=3e-3, beta=0.5, lora_rank=4, merge_lora=False,
                              **common))
    start, end = _records(dpo_dir)[0], _records(dpo_dir)[-1]
    assert start["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert end["val_loss"] < 0.6 and end["val_reward_accuracy"] > 0.9, end
    assert not (dpo_dir / "model.safetensors").exists()  # merge_lora=false: only the adapter
    merged = merge_adapter(MergeSettings(base=str(sft_dir), adapter=str(dpo_dir), out_dir=str(tmp_path / "merged")))
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    llm = LLM(str(merged), dtype="float32", kv_cache_memory="32MiB")
    ids = llm.get_tokenizer().encode("What is 2 plus 3?")
    with torch.no_grad():
        torch.testing.assert_close(llm.engine.runner.model.causal_logits(torch.tensor([ids])),
                                   hf(torch.tensor([ids])).logits, rtol=1e-4, atol=1e-4)
    server = RunningServer(str(merged), "--served-model-name", "chain", "--kv-cache-memory", "32MiB")
    try:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers, timeout=60, json={
            "model": "chain", "messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.stop()


@pytest.mark.slow
def test_two_ddp_processes_follow_the_single_process_dpo_curve(toy_pretrained_dir, tmp_path):
    """DDP over a LoRA policy (frozen base weights) with a frozen reference beside it, on padded pair batches."""
    from tests.conftest import torchrun
    common = dict(model=str(toy_pretrained_dir), data=[_pairs(tmp_path / "p.jsonl", 32, 0)], max_steps=4,
                  batch_size=4, warmup_steps=1, lr=1e-2, beta=0.5, lora_rank=4, progress=False)
    one = dpo(DPOSettings(out_dir=str(tmp_path / "one"), grad_accum=2, **common))
    torchrun("dpo", {**common, "out_dir": tmp_path / "two"})
    header = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2 and header["stage"] == "dpo"
    losses = [[r["loss"] for r in _records(out)] for out in (one, tmp_path / "two")]
    assert len(losses[0]) == 4 and losses[0][-1] < losses[0][0] - 0.01  # it moves
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_nll_weight_adds_the_chosen_answers_likelihood_to_the_loss(toy_pretrained_dir, tmp_path):
    common = dict(model=str(toy_pretrained_dir), data=[_pairs(tmp_path / "p.jsonl", 8, 0)], max_steps=1,
                  batch_size=4, progress=False)
    plain = _records(dpo(DPOSettings(out_dir=str(tmp_path / "plain"), **common)))[0]["loss"]
    rpo = _records(dpo(DPOSettings(out_dir=str(tmp_path / "rpo"), nll_weight=1.0, **common)))[0]["loss"]
    assert plain == pytest.approx(0.6931, abs=1e-4)  # policy == reference: -log sigmoid(0)
    assert rpo > plain + 1.0  # + the chosen answers' mean token NLL under an untrained-for-chat model
