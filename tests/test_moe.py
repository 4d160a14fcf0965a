"""Mixture-of-Experts models (models/moe.py, kernels/moe.py): token-exact with transformers on random checkpoints
that transformers wrote, however requests are served; the router and the grouped expert computation against
their definitions; expert fields checked with errors that name them."""
import json

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from kernels import moe as moe_kernels
from models.config import ModelConfig
from models.hf_loader import hf_config
from tests.conftest import TINY_MOE_ARCHS
from tests.test_engine_fidelity import shared_prefix_prompts
from tests.test_llama import MAX_TOKENS, _check_exact, _tiny_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# the compiled CPU decode step for two of them (a cold compile costs ~12 s on 2 cores), eager steps for the others
COMPILED = ("mixtral", "qwen2_moe")


@pytest.mark.parametrize("arch", TINY_MOE_ARCHS)
def test_greedy_generation_is_token_identical_to_transformers_however_served(arch, tiny_checkpoint):
    import transformers
    directory = tiny_checkpoint(arch)
    cfg = ModelConfig.from_hf(hf_config(directory))
    assert cfg.num_experts and any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)) == \
        (arch in ("qwen2_moe", "qwen3_moe"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = _tiny_prompts()
    llm = LLM(str(directory), dtype="float32", num_kv_blocks=64, enforce_eager=arch not in COMPILED)
    assert (llm.engine.runner.decode_step is not None) == (arch in COMPILED)
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check_exact(hf, prompts, batched)
    expected = _tokens(batched)
    assert [_tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts] == expected  # alone, warm
    assert llm.engine.block_manager.prefix_hits > 0
    chunked = LLM(str(directory), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=5, enforce_eager=True)
    assert _tokens(chunked.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_a_moe_model_serves_the_same_tokens_under_preemption_and_on_triton(tiny_checkpoint):
    model = str(tiny_checkpoint("qwen2_moe"))
    prompts = shared_prefix_prompts(512)[:8]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(model, dtype="float32", max_model_len=160, num_kv_blocks=128, enforce_eager=True,
                enable_prefix_caching=False)
    alone = [_tokens(plain.generate([p], params, use_tqdm=False))[0] for p in prompts]
    tight = LLM(model, dtype="float32", max_model_len=160, num_kv_blocks=14, enforce_eager=True)
    assert _tokens(tight.generate(prompts, params, use_tqdm=False)) == alone
    assert tight.engine.num_preemptions > 0
    pytest.importorskip("triton")  # the interpreter is slow: one prompt, prefilled in two chunks, four tokens
    triton = LLM(model, dtype="float32", max_model_len=160, num_kv_blocks=64, attention_backend="triton",
                 max_num_batched_tokens=24)
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert _tokens(triton.generate(prompts[:1], short, use_tqdm=False)) == [alone[0][:4]]


# ---- the router and the experts against their definitions ----------------------------------------------------------

def _experts(num_experts=6, hidden=24, inter=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, 2 * inter, hidden, generator=g) / 5,
            torch.randn(num_experts, hidden, inter, generator=g) / 5)


def _by_definition(x, w13, w2, weights, ids):
    """One token and one expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += w * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, True), (4, False)])
def test_route_takes_the_top_k_softmax_weights_and_renormalizes_when_asked(top_k, renormalize):
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(top_k))
    weights, ids = moe_kernels.route(logits, top_k, renormalize)
    probs = logits.softmax(-1)
    assert torch.equal(ids, probs.argsort(-1, descending=True)[:, :top_k])
    want = probs.gather(1, ids)
    want = want / want.sum(-1, keepdim=True) if renormalize else want
    torch.testing.assert_close(weights, want)


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (7, 2), (33, 4)])
def test_grouped_experts_equal_the_per_token_definition_with_idle_experts(tokens, top_k):
    w13, w2 = _experts()
    x = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(tokens))
    logits = torch.randn(tokens, 6, generator=torch.Generator().manual_seed(1))
    logits[:, 4:] -= 100  # experts 4 and 5 receive no token
    weights, ids = moe_kernels.route(logits, top_k, True)
    got = moe_kernels.fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, _by_definition(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-6)
    assert moe_kernels.fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 24)


def test_a_tokens_expert_output_does_not_depend_on_who_shares_its_experts():
    w13, w2 = _experts()
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    weights, ids = moe_kernels.route(torch.randn(40, 6, generator=torch.Generator().manual_seed(4)), 2, True)
    full = moe_kernels.fused_moe(x, w13, w2, weights, ids)
    for rows in ([5], [0, 5, 9], list(range(17)), list(range(39, -1, -1))):
        got = moe_kernels.fused_moe(x[rows], w13, w2, weights[rows], ids[rows])
        # float32 GEMMs round a row differently at different row counts (as the dense float32 path's do): equal
        # to that rounding; the GGUF path's kernels keep a row bit-identical
        torch.testing.assert_close(got, full[rows], rtol=1e-5, atol=1e-6)


def test_the_experts_op_compiles_whole_and_agrees_with_eager():
    w13, w2 = _experts()
    x = torch.randn(5, 24)
    weights, ids = moe_kernels.route(torch.randn(5, 6), 2, True)
    compiled = torch.compile(moe_kernels.fused_moe_op, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w13, w2, weights, ids), moe_kernels.fused_moe(x, w13, w2, weights, ids))


def test_the_load_balancing_loss_is_top_k_at_balance_and_grows_with_imbalance():
    balanced = torch.zeros(64, 4)
    balanced[torch.arange(64), torch.arange(64) % 4] = 5.0
    assert moe_kernels.load_balancing_loss(balanced, 1).item() == pytest.approx(1.0, abs=1e-5)
    skewed = torch.zeros(64, 4)
    skewed[:, 0] = 5.0
    assert moe_kernels.load_balancing_loss(skewed, 1).item() > 3


# ---- bad configs --------------------------------------------------------------------------------------------------

def _qwen3_moe(**over) -> dict:
    base = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16}
    return {k: v for k, v in {**base, **over}.items() if v is not None}


@pytest.mark.parametrize("over,field", [
    ({"num_experts": None}, "num_experts"),
    ({"num_experts_per_tok": None}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"num_experts": 0}, "num_experts"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ({"mlp_only_layers": [2]}, "mlp_only_layers"),
    ({"mlp_only_layers": [0], "intermediate_size": None}, "intermediate_size"),
    ({"architectures": ["Qwen2MoeForCausalLM"]}, "shared_expert_intermediate_size"),
    ({"architectures": ["MixtralForCausalLM"]}, "num_local_experts"),
])
def test_missing_or_inconsistent_expert_fields_are_named(over, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(_qwen3_moe(**over))


def test_a_checkpoint_with_fewer_experts_than_its_config_is_refused(tiny_checkpoint, tmp_path):
    import shutil
    directory = tmp_path / "moe"
    shutil.copytree(tiny_checkpoint("mixtral"), directory)
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**cfg, "num_local_experts": 6}))
    with pytest.raises(ValueError, match=r"mlp.gate.weight.*\(4, 64\).*\(6, 64\)"):
        LLM(str(directory), dtype="float32", num_kv_blocks=16, enforce_eager=True)


def test_dense_architectures_refuse_expert_fields():
    with pytest.raises(ValueError, match="num_experts"):
        ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16)


# ---- expert load, for /metrics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("eager", [True, False])
def test_expert_load_counts_every_computed_token_top_k_times_in_moe_layers_only(tiny_checkpoint, eager):
    from server.metrics import Metrics
    llm = LLM(str(tiny_checkpoint("qwen2_moe")), dtype="float32", num_kv_blocks=64, enable_prefix_caching=False,
              enforce_eager=eager)
    assert set(llm.engine.expert_load()) == {1}  # decoder_sparse_step 2: layer 0 is dense
    assert sum(llm.engine.expert_load()[1]) == 0  # warm-up and compile steps are not counted
    prompts = _tiny_prompts()[:3]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    load = llm.engine.expert_load()[1]
    assert len(load) == 8 and sum(load) == 4 * sum(len(p) + 7 - 1 for p in prompts)  # top-4 of 8
    metrics = Metrics("tiny")
    metrics.set_expert_load(llm.engine.expert_load())
    text = metrics.render().decode()
    assert f'tokenmill:moe_expert_tokens{{expert="3",layer="1",model_name="tiny"}} {float(load[3])}' in text


def test_int4_quantizes_the_projections_and_keeps_routers_and_experts_float32(tiny_checkpoint):
    from models.quantize import Int4Linear
    llm = LLM(str(tiny_checkpoint("qwen2_moe")), quantization="int4", num_kv_blocks=32, enforce_eager=True)
    layer = llm.engine.runner.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear)
    assert isinstance(layer.mlp.shared_expert.gate_up_proj, Int4Linear)
    assert not isinstance(layer.mlp.gate, Int4Linear) and not isinstance(layer.mlp.shared_expert_gate, Int4Linear)
    assert layer.mlp.experts.w13.dtype == torch.float32
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
