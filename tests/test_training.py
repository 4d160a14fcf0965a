"""Training stages at toy size: the tokenizer, pretraining (loss, exact resume, DDP = one process), and the
checkpoint they write loading in transformers, our engine and the real server."""
import json
from pathlib import Path

import httpx
import pytest
import sentencepiece as spm
import torch

from text.tokenizer import Tokenizer
from training.data import PackedSamples, read_documents, read_jsonl
from training.pretrain import PretrainSettings, lr_at, pretrain
from training.settings import load_settings
from tests.conftest import TOY_CORPUS as CORPUS, TOY_MODEL as TOY, torchrun


@pytest.fixture
def tokenizer_dir(toy_tokenizer_dir) -> Path:
    return toy_tokenizer_dir


def _losses(out_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_tokenizer_json_encodes_as_sentencepiece_and_transformers_agrees(tokenizer_dir):
    import transformers
    ours = Tokenizer.from_dir(tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ["def step(self) -> list[int]:", "  two  spaces\nand\ttabs 12345", "Über café 東京 😀"]:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text) == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text  # byte fallback: nothing is lost, even outside the corpus's alphabet
    chat = [{"role": "user", "content": "hi"}]
    rendered = ours.apply_chat_template(chat)
    assert rendered == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = ours.encode(rendered, add_special_tokens=False)
    assert ours.token_to_id("<|im_start|>") in ids and ours.eos_token_id == ours.token_to_id("<|im_end|>")


def test_settings_come_from_a_file_then_overrides_with_clear_errors(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('max_steps = 7\nlr = 0.01\ndata = ["a.txt"]\n')
    s = load_settings(PretrainSettings, str(config), ["lr=0.02", "resume=true", "data=x.txt,y.txt"])
    assert (s.max_steps, s.lr, s.resume, s.data) == (7, 0.02, True, ["x.txt", "y.txt"])
    with pytest.raises(ValueError, match="unknown setting.*max_step"):
        load_settings(PretrainSettings, None, ["max_step=3"])
    with pytest.raises(ValueError, match="setting max_steps: 'ten'"):
        load_settings(PretrainSettings, None, ["max_steps=ten"])


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: .*\"text\""):
        read_documents([str(path)])
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        read_documents([str(tmp_path / "*.txt")])


def test_sample_order_depends_only_on_seed_and_index():
    tokens = torch.arange(1000)
    a, b = PackedSamples(tokens, 9, seed=3), PackedSamples(tokens, 9, seed=3)
    assert torch.equal(a.batch(200, 4)[0], b.batch(200, 4)[0])  # b never produced samples 0..199
    epoch = torch.cat([a.window(g)[:-1] for g in range(a.num_windows)])
    assert sorted(epoch.tolist()) == list(range(a.num_windows * 9))  # an epoch sees every window once


def test_schedule_warms_up_then_decays_to_min_lr():
    s = PretrainSettings(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(60, s) == pytest.approx(0.55) and lr_at(110, s) == pytest.approx(0.1)


def _settings(tokenizer_dir, out_dir, **kw) -> PretrainSettings:
    return PretrainSettings(data=CORPUS, tokenizer=str(tokenizer_dir), out_dir=str(out_dir), **{**TOY, **kw})


def test_resumed_pretraining_continues_bit_identically(tokenizer_dir, tmp_path):
    whole = pretrain(_settings(tokenizer_dir, tmp_path / "whole", max_steps=10))
    pretrain(_settings(tokenizer_dir, tmp_path / "split", max_steps=10, stop_at=4))
    assert len(_losses(tmp_path / "split")) == 4
    pretrain(_settings(tokenizer_dir, tmp_path / "split", max_steps=10, resume=True))
    assert _losses(tmp_path / "split") == _losses(whole)
    from safetensors.torch import load_file
    a, b = load_file(whole / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_ddp_processes_follow_the_single_process_loss_curve(tokenizer_dir, tmp_path):
    single = pretrain(_settings(tokenizer_dir, tmp_path / "one", max_steps=6, grad_accum=2))
    torchrun("pretrain", {**TOY, "data": CORPUS, "tokenizer": tokenizer_dir, "out_dir": tmp_path / "two",
                          "max_steps": 6})
    assert json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[0])["world_size"] == 2
    assert _losses(tmp_path / "two") == pytest.approx(_losses(single), rel=1e-5)


@pytest.mark.slow
def test_pretrained_checkpoint_matches_transformers_and_is_served(toy_pretrained_dir):
    import transformers

    from engine import LLM, SamplingParams
    from tests.conftest import RunningServer
    out = toy_pretrained_dir
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5  # it learns
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    llm = LLM(str(out), dtype="float32", kv_cache_memory="32MiB")
    ids = llm.get_tokenizer().encode("def step(self):")
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    actual = llm.engine.runner.model.causal_logits(torch.tensor([ids]))[0]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    greedy = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert ours[0].outputs[0].token_ids == greedy
    server = RunningServer(str(out), "--served-model-name", "toy", "--kv-cache-memory", "32MiB")
    try:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers, timeout=60, json={
            "model": "toy", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
