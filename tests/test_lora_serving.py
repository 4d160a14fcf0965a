"""Many LoRA adapters served over one base model: an adapter's greedy output equals its merged checkpoint's
(float32), a batch mixing four adapters and the base equals each request alone, a PEFT-format adapter serves as
the same adapter in tokenmill's format, and bad adapters are refused naming the problem."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.lora import LoRARequest
from models.loading import load_model
from training.lora import DEFAULT_TARGETS, MergeSettings, add_lora, merge_adapter, save_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 31, 77, 12, 40], list(range(20, 60)), [7] * 9, [300, 301, 302]]


def _adapter(base: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """An adapter as `tokenmill train sft lora_rank=R merge_lora=false` writes it, with random (non-zero) B."""
    loaded = load_model(str(base), "float32", "cpu")
    add_lora(loaded.model, rank, 2.0 * rank, DEFAULT_TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(loaded.model, out, rank, 2.0 * rank, DEFAULT_TARGETS, str(base))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [_adapter(tiny_checkpoint("llama"), root / f"a{i}", seed=i) for i in range(4)]


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=256, max_model_len=256,
               enable_lora=True, max_loras=4, max_lora_rank=8)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_adapter_output_equals_the_merged_checkpoint(tiny_checkpoint, adapters, served, tmp_path):
    merged = merge_adapter(MergeSettings(base=str(tiny_checkpoint("llama")), adapter=str(adapters[0]),
                                         out_dir=str(tmp_path / "merged")))
    want = _tokens(LLM(str(merged), dtype="float32", num_kv_blocks=64, max_model_len=256).generate(
        PROMPTS, GREEDY, use_tqdm=False))
    got = _tokens(served.generate(PROMPTS, GREEDY, use_tqdm=False,
                                  lora_request=LoRARequest("a0", 1, str(adapters[0]))))
    assert got == want
    base = _tokens(served.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert base != want  # the adapter changes the answers


def test_a_batch_of_four_adapters_and_the_base_equals_each_alone(adapters, served):
    requests = [None] + [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
    alone = [_tokens(served.generate([PROMPTS[1]], GREEDY, use_tqdm=False, lora_request=r))[0] for r in requests]
    assert len({tuple(t) for t in alone}) == 5  # five different models
    batch = _tokens(served.generate([PROMPTS[1]] * 5, GREEDY, use_tqdm=False, lora_request=requests))
    assert batch == alone
    bm = served.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_peft_adapter_serves_as_the_same_adapter(tiny_checkpoint, adapters, served, tmp_path):
    """adapters[1] rewritten in PEFT's layout: Hugging Face module names, q/k/v and gate/up apart."""
    from safetensors.torch import load_file
    ours = load_file(adapters[1] / "adapter_model.safetensors")
    config = json.loads((adapters[1] / "adapter_config.json").read_text())
    cfg = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, width = cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head, cfg["intermediate_size"]
    peft = {}
    for key in ours:
        if not key.endswith(".lora_a"):
            continue
        module = key.removesuffix(".lora_a")
        a, b = ours[key], ours[f"{module}.lora_b"]
        prefix, _, leaf = module.rpartition(".")
        splits = {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [q, kv, kv]),
                  "gate_up_proj": (["gate_proj", "up_proj"], [width, width])}.get(leaf, ([leaf], [b.shape[0]]))
        for name, part in zip(splits[0], b.split(splits[1])):  # one shared A: each part keeps it whole
            peft[f"base_model.model.model.{prefix}.{name}.lora_A.weight"] = a.clone()
            peft[f"base_model.model.model.{prefix}.{name}.lora_B.weight"] = part.contiguous()
    out = tmp_path / "peft"
    out.mkdir()
    save_file(peft, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config["r"], "lora_alpha": config["lora_alpha"],
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    want = _tokens(served.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=LoRARequest("a1", 2, str(adapters[1]))))
    got = _tokens(served.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=LoRARequest("peft", 9, str(out))))
    assert got == want


def test_bad_adapters_are_refused_naming_the_problem(tiny_checkpoint, served, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        served.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request=LoRARequest("x", 1, str(tmp_path)))
    high = _adapter(tiny_checkpoint("llama"), tmp_path / "high", seed=5, rank=16)
    with pytest.raises(ValueError, match=r"rank 16, above max_lora_rank \(8\)"):
        served.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request=LoRARequest("high", 2, str(high)))
    other = _adapter(tiny_checkpoint("qwen3"), tmp_path / "other", seed=6)  # head_dim 32: other shapes
    with pytest.raises(ValueError, match="trained on another base model"):
        served.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request=LoRARequest("other", 3, str(other)))
    plain = LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=32, max_model_len=256)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.generate([PROMPTS[0]], GREEDY, use_tqdm=False, lora_request=LoRARequest("x", 1, str(high)))
    assert _tokens(served.generate([PROMPTS[0]], GREEDY, use_tqdm=False))  # the engine goes on


def test_server_serves_adapters_by_model_name_and_loads_them_while_others_stream(tiny_checkpoint, adapters, served,
                                                                                  tmp_path):
    import threading
    import time

    import httpx

    from tests.conftest import RunningServer
    server = RunningServer(str(tiny_checkpoint("llama")), "--served-model-name", "tiny", "--dtype", "float32",
                           "--max-model-len", "256", "--kv-cache-memory", "16MiB", "--embedding-model", "none",
                           "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"a0={adapters[0]}")
    url, headers = server.base_url, server.headers

    def complete(model: str, **extra) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", headers=headers, timeout=120, json={
            "model": model, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "ignore_eos": True, **extra})

    try:
        cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models", headers=headers).json()["data"]}
        assert cards["a0"]["parent"] == "tiny" and cards["tiny"]["parent"] is None
        offline = served.generate([PROMPTS[1]], GREEDY, use_tqdm=False,
                                  lora_request=LoRARequest("a0", 1, str(adapters[0])))[0].outputs[0].text
        assert complete("a0").json()["choices"][0]["text"] == offline
        long_done = {}
        stream = threading.Thread(target=lambda: long_done.update(r=complete("a0", max_tokens=200)))
        stream.start()  # a0 streams while a1 is loaded and a0 unloaded
        for _ in range(100):  # vLLM's lora_requests_info names the running request's adapter
            info = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                    if line.startswith("tokenmill:lora_requests_info{")]
            if info and 'running_lora_adapters="a0"' in info[0]:
                break
            time.sleep(0.05)
        assert 'running_lora_adapters="a0"' in info[0] and 'max_lora="4"' in info[0], info
        loaded = httpx.post(f"{url}/v1/load_lora_adapter", headers=headers,
                            json={"lora_name": "a1", "lora_path": str(adapters[1])})
        assert loaded.status_code == 200, loaded.text
        assert complete("a1").status_code == 200
        assert httpx.post(f"{url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "a0"}).status_code == 200
        stream.join(120)
        assert long_done["r"].status_code == 200 and long_done["r"].json()["usage"]["completion_tokens"] == 200
        gone = complete("a0")
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
        bad = [({"lora_name": "x", "lora_path": str(tmp_path / "nothing")}, 404, "lora_path"),
               ({"lora_name": "a1", "lora_path": str(adapters[2])}, 400, "lora_name"),
               ({"lora_name": "tiny", "lora_path": str(adapters[2])}, 400, "lora_name"),
               ({"lora_name": "x"}, 400, "lora_path")]
        for body, status, param in bad:
            r = httpx.post(f"{url}/v1/load_lora_adapter", headers=headers, json=body)
            assert r.status_code == status and r.json()["error"]["param"] == param, r.text
        r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "nope"})
        assert r.status_code == 404
        assert complete("tiny").status_code == 200
    finally:
        server.stop()
