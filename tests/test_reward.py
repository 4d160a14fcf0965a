"""Reward models: Bradley-Terry training on preference pairs separates held-out pairs, and the written
`LlamaForSequenceClassification` gives transformers' scores, alone and in a padded batch."""
import json

import pytest
import torch

from models.reward import is_reward_model, load_reward_model
from tests.test_dpo import _pairs
from training.reward import RewardSettings, reward


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]


def test_bad_pairs_are_refused_naming_file_and_line(toy_pretrained_dir, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: .*\"chosen\" and \"rejected\""):
        reward(RewardSettings(model=str(toy_pretrained_dir), data=[str(path)], out_dir=str(tmp_path / "rm"),
                              progress=False))
    with pytest.raises(ValueError, match="merge_lora"):
        reward(RewardSettings(model=str(toy_pretrained_dir), data=[str(path)], lora_rank=2, merge_lora=False))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_reward_model_learns_pairs_and_scores_like_transformers(toy_pretrained_dir, tmp_path, lora_rank):
    import transformers
    train, held_out = _pairs(tmp_path / "train.jsonl", 64, 0), _pairs(tmp_path / "val.jsonl", 32, 1)
    out = reward(RewardSettings(model=str(toy_pretrained_dir), data=[train], val_data=[held_out],
                                out_dir=str(tmp_path / "rm"), max_steps=12, eval_every=12, batch_size=8,
                                warmup_steps=2, lr=1e-2 if lora_rank else 1e-3, lora_rank=lora_rank, progress=False))
    first, last = _records(out)[0], _records(out)[-1]
    assert last["val_accuracy"] >= 0.95 and last["val_margin"] > first["val_margin"] + 0.5, (first, last)
    assert last["val_loss"] < first["val_loss"] - 0.15
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert is_reward_model(out) and not is_reward_model(toy_pretrained_dir)
    assert (out / "adapter_model.safetensors").is_file() == bool(lora_rank)

    ours, tokenizer = load_reward_model(out)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"},
                                            {"role": "assistant", "content": answer}], add_generation_prompt=False)
             for answer in ("2 plus 3 is 5.", "I do not know what 2 plus 3 is.", "5")]
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), config["pad_token_id"])
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        alone = torch.stack([hf(torch.tensor([row])).logits[0, 0] for row in rows])
        batched = hf(ids, attention_mask=mask).logits[:, 0]
    scores = ours.score_ids(rows)
    torch.testing.assert_close(scores, alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(scores, batched, rtol=0, atol=1e-4)
    assert scores[0] > scores[1]  # the held-out-style chosen answer wins


@pytest.mark.slow
def test_two_ddp_processes_follow_the_single_process_reward_curve(toy_pretrained_dir, tmp_path):
    from tests.conftest import torchrun
    common = dict(model=str(toy_pretrained_dir), data=[_pairs(tmp_path / "p.jsonl", 32, 0)], max_steps=3,
                  batch_size=4, warmup_steps=1, lr=1e-3, progress=False)
    one = reward(RewardSettings(out_dir=str(tmp_path / "one"), grad_accum=2, **common))
    torchrun("reward", {**common, "out_dir": tmp_path / "two"})
    losses = [[r["loss"] for r in _records(out)] for out in (one, tmp_path / "two")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
