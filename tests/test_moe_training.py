"""Mixture-of-Experts pretraining at toy size: the checkpoint is a Mixtral that transformers loads with the same
logits and the same training objective and that the real server serves; the load-balancing loss is part of the
training loss, logged, kept out of validation, and evens out a router that favours one expert; bad expert settings
name the field; fine-tuning stages load the checkpoint."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kernels.moe import load_balancing_loss
from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.loading import load_model
from models.moe import moe_layers
from training.lora import add_lora
from training.pretrain import PretrainSettings, causal_lm_loss, collect_router_logits, pretrain, with_aux_loss
from training.settings import load_settings
from tests.conftest import TOY_CORPUS, TOY_MODEL

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, router_aux_loss_coef=0.01)
STEPS = 6


def _records(out: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return lines[0], lines[1:]


@pytest.fixture(scope="module")
def moe_dir(toy_tokenizer_dir, tmp_path_factory) -> Path:
    return pretrain(PretrainSettings(data=TOY_CORPUS, tokenizer=str(toy_tokenizer_dir), max_steps=STEPS,
                                     out_dir=str(tmp_path_factory.mktemp("moe")), **{**TOY_MODEL, **MOE}))


def test_moe_checkpoint_is_a_mixtral_with_transformers_logits_and_loss(moe_dir):
    import transformers

    from engine import LLM, SamplingParams
    config = json.loads((moe_dir / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["router_aux_loss_coef"]) == (4, 2, 0.01)
    assert config["intermediate_size"] == 64 and config["tie_word_embeddings"]  # the experts' width
    names = load_file(moe_dir / "model.safetensors")
    assert {"model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight"} \
        <= set(names) and "lm_head.weight" not in names
    header, _ = _records(moe_dir)
    idle = 2 * (4 - 2) * 3 * 64 * 64  # per layer: two experts of gate, up and down [64 x 64] a token does not use
    assert header["architecture"] == "MixtralForCausalLM"
    assert header["active_parameters"] == header["parameters"] - idle

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert type(hf).__name__ == "MixtralForCausalLM" and not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    llm = LLM(str(moe_dir), dtype="float32", kv_cache_memory="32MiB", enforce_eager=True)
    model = llm.engine.runner.model
    ids = llm.get_tokenizer().encode("def step(self): return self.scheduler")
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = hf(x, labels=x, output_router_logits=True)
        torch.testing.assert_close(model.causal_logits(x)[0], expected.logits[0], rtol=1e-4, atol=1e-4)
        # transformers' training objective: CE + router_aux_loss_coef * aux over every token's routing
        targets = torch.cat([x[:, 1:], torch.full((1, 1), -100)], dim=1)
        loss, terms = with_aux_loss(model, causal_lm_loss, 0.01)(model.causal_logits, x, targets)
    torch.testing.assert_close(terms["aux_loss"], expected.aux_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-4, atol=1e-5)
    greedy = hf.generate(x, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    ours = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert ours[0].outputs[0].token_ids == greedy


def test_moe_checkpoint_is_served_over_http(moe_dir):
    import openai

    from tests.conftest import RunningServer
    server = RunningServer(str(moe_dir), "--served-model-name", "toy-moe", "--kv-cache-memory", "32MiB",
                           "--dtype", "float32", "--enforce-eager")
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="toy-moe", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=5)
        assert reply.model == "toy-moe" and reply.usage.completion_tokens >= 1
    finally:
        server.stop()


def test_every_step_logs_the_aux_loss_and_validation_leaves_it_out(toy_tokenizer_dir, tmp_path, moe_dir):
    _, records = _records(moe_dir)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == STEPS and all(1.9 < r["aux_loss"] < 4 for r in steps)  # 2 (= top_k) at balance
    # a huge coefficient: the trained objective carries it, the validation loss (plain cross-entropy) does not
    out = pretrain(PretrainSettings(data=TOY_CORPUS, tokenizer=str(toy_tokenizer_dir), out_dir=str(tmp_path),
                                    max_steps=1, eval_batches=2, **{**TOY_MODEL, **MOE, "router_aux_loss_coef": 100}))
    first = _records(out)[1][1]
    assert first["loss"] == pytest.approx(first["val_loss"] + 100 * first["aux_loss"], abs=1.0)
    assert first["val_loss"] < 8  # log(800) = 6.7 at the start
    dense = pretrain(PretrainSettings(data=TOY_CORPUS, tokenizer=str(toy_tokenizer_dir), out_dir=str(tmp_path / "d"),
                                      max_steps=1, eval_batches=1, **TOY_MODEL))
    assert "aux_loss" not in _records(dense)[1][1] and _records(dense)[0]["architecture"] == "LlamaForCausalLM"


def _tiny_mixtral() -> LlamaForCausalLM:
    cfg = ModelConfig(architecture="MixtralForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=32,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=1,
                      moe_intermediate_size=32, norm_topk_prob=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _top_share(model: LlamaForCausalLM, x: torch.Tensor) -> float:
    """The largest share of (token, layer) routings that one expert gets."""
    with torch.no_grad(), collect_router_logits(model) as logits:
        model.causal_logits(x)
    ids = torch.cat(logits).argmax(-1)
    return float(torch.bincount(ids, minlength=4).max() / len(ids))


@pytest.mark.parametrize("coef", [0.0, 1.0])
def test_the_aux_loss_evens_out_a_router_that_favours_one_expert(coef):
    model = _tiny_mixtral()
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    with torch.no_grad():  # every token's hidden state gets a large first coordinate; expert 0's router row reads it
        model.embed_tokens.weight[:, 0] = 1.0
        for layer in moe_layers(model):
            layer.gate.weight[0, 0] = 2.0
    before = _top_share(model, x)
    assert before > 0.9
    model.requires_grad_(False)
    routers = [layer.gate.weight.requires_grad_(True) for layer in moe_layers(model)]
    optimizer = torch.optim.Adam(routers, lr=0.05)
    loss_of = with_aux_loss(model, causal_lm_loss, coef)
    for _ in range(30):
        loss, terms = loss_of(model.causal_logits, x, y)
        if coef:
            assert loss.item() == pytest.approx(causal_lm_loss(model.causal_logits, x, y).item()
                                                + coef * terms["aux_loss"].item(), rel=1e-5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _top_share(model, x)
    # top-1 with renormalized weights (always 1): the router learns from the aux loss alone
    assert (after < 0.5) if coef else (after > 0.9)
    if coef:
        with torch.no_grad(), collect_router_logits(model) as logits:
            model.causal_logits(x)
        assert load_balancing_loss(torch.cat(logits), 1) < 1.5  # 1 at perfect balance, ~4 when all go to one


@pytest.mark.parametrize("override,field", [
    ("num_experts=-1", "num_experts"), ("num_experts_per_tok=5", "num_experts_per_tok"),
    ("num_experts_per_tok=0", "num_experts_per_tok"), ("router_aux_loss_coef=-0.1", "router_aux_loss_coef"),
    ("router_aux_loss_coef=nan", "router_aux_loss_coef"), ("moe_intermediate_size=-8", "moe_intermediate_size")])
def test_bad_expert_settings_name_the_field(override, field):
    with pytest.raises(ValueError, match=f"setting {field}:"):
        load_settings(PretrainSettings, None, ["num_experts=4", override])


def test_fine_tuning_stages_load_the_moe_checkpoint(moe_dir, tmp_path):
    from training.sft import SFTSettings, sft
    model = load_model(str(moe_dir), "float32").model
    trainable = add_lora(model, 2, 4.0, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])  # the defaults
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn." in n and "lora_" in n for n in lora)  # experts are left alone
    add_lora(load_model(str(moe_dir), "float32").model, 2, 4.0, ["gate"])  # routers can be named
    with pytest.raises(ValueError, match="lora_targets"):
        add_lora(load_model(str(moe_dir), "float32").model, 2, 4.0, ["gate_up_proj"])  # nothing to adapt
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i}?"},
                                                     {"role": "assistant", "content": f"it is {i}."}]}) + "\n"
                            for i in range(8)))
    out = sft(SFTSettings(model=str(moe_dir), data=[str(data)], out_dir=str(tmp_path / "sft"), max_steps=2,
                          batch_size=4, progress=False))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    tuned = load_model(str(out), "float32").model
    assert not torch.equal(tuned.layers[0].mlp.experts.w2, model.layers[0].mlp.experts.w2)  # full SFT moves experts
