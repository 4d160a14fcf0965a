"""Mixture-of-Experts GGUF files (issue 18): tiny random MoE checkpoints written as llama.cpp's converter writes them
(Mixtral as arch "llama" with q/k rows permuted, Qwen2-MoE with its shared expert, Qwen3-MoE; experts stacked in 3-D
`ffn_{gate,up,down}_exps` tensors; a dense block lacks them) read back as the directory they came from, and served on
quantization="gguf" with every token's output bit-identical however it is batched."""
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from kernels import cpu_ops
from kernels.cpu_quant import q8_0_from_float
from models.config import ModelConfig
from models.gguf_experts import GGUFExperts, GGUFSparseMoE, InvariantLinear, invariant_route
from models.gguf_loader import QuantizedWeight, gguf_quantized, gguf_to_hf_config, open_gguf
from models.hf_loader import hf_config
from models.loading import load_config, load_model
from models.moe import SparseMoE
from tests.conftest import TINY_VOCAB, _add_gguf_tokenizer, add_gguf_tensor, finish_gguf

_MISSING = cpu_ops.missing()
needs_kernels = pytest.mark.skipif(_MISSING is not None, reason=f"tokenmill's CPU kernels cannot be built: {_MISSING}")

# ---- the files: llama.cpp's names, spelled out here rather than read from the loader -----------------------------

_ARCHS = {"MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "block_sparse_moe.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
          "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
          "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
# one expert's matrix (transformers' per-expert names, Mixtral's w1/w3/w2) -> the stacked tensor
_EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
           "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: q/k rows reordered for its interleaved rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(checkpoint: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under llama.cpp's names, experts stacked per block as its converter stacks them."""
    out, experts = {}, {}
    for name, w in load_file(checkpoint / "model.safetensors").items():
        if name in _TOP:
            out[_TOP[name]] = w
            continue
        _, _, layer, *module, suffix = name.split(".")
        if "experts" in module:  # ...experts.E.w1.weight
            experts.setdefault(f"blk.{layer}.{_EXPERT[module[-1]]}.weight", {})[int(module[-2])] = w
            continue
        if cfg.architecture == "MixtralForCausalLM" and module[-1] in ("q_proj", "k_proj"):
            w = _permute(w, cfg.num_heads if module[-1] == "q_proj" else cfg.num_kv_heads)
        out[f"blk.{layer}.{_LAYER['.'.join(module)]}.{suffix}"] = w
    for name, per_expert in experts.items():
        out[name] = np.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def _tensor_type(name: str, quantized: bool) -> gguf.GGMLQuantizationType:
    """llama.cpp's choices: norms, biases, routers and the shared expert's gate F32; embeddings Q8_0; the rest Q4_1."""
    T = gguf.GGMLQuantizationType
    if not quantized or not name.endswith(".weight") or "norm" in name or "ffn_gate_inp" in name:
        return T.F32
    return T.Q8_0 if name in ("token_embd.weight", "output.weight") else T.Q4_1


def write_moe_gguf(checkpoint: Path, path: Path, quantized: bool, **metadata) -> Path:
    """A tiny MoE checkpoint directory as a GGUF file, F32 or with Q4_1 projections; `metadata` overrides
    expert_count / expert_used_count, `drop_expert=True` leaves the last expert out of every exps tensor."""
    cfg = ModelConfig.from_hf(hf_config(checkpoint))
    arch = _ARCHS[cfg.architecture]
    drop = metadata.pop("drop_expert", False)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_expert_count(metadata.get("expert_count", cfg.num_experts))
    writer.add_expert_used_count(metadata.get("expert_used_count", cfg.num_experts_per_tok))
    if arch != "llama":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    _add_gguf_tokenizer(writer, checkpoint, cfg.vocab_size)
    for name, w in sorted(_gguf_tensors(checkpoint, cfg).items()):
        if drop and name.endswith("_exps.weight"):
            w = w[:-1]
        add_gguf_tensor(writer, name, w, _tensor_type(name, quantized))
    return finish_gguf(writer, path)


@pytest.fixture(scope="module")
def moe_gguf(tiny_checkpoint, tmp_path_factory):
    """moe_gguf(arch, quantized) -> the file, written once per module."""
    made: dict[tuple[str, bool], Path] = {}

    def make(arch: str, quantized: bool) -> Path:
        if (arch, quantized) not in made:
            path = tmp_path_factory.mktemp("moe-gguf") / f"{arch}-{'q4_1' if quantized else 'f32'}.gguf"
            made[arch, quantized] = write_moe_gguf(tiny_checkpoint(arch), path, quantized)
        return made[arch, quantized]

    return make


# ---- (a) float32: the file is the checkpoint ---------------------------------------------------------------------

def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model.causal_logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_an_f32_moe_gguf_computes_what_its_checkpoint_directory_computes(moe_gguf, tiny_checkpoint, arch):
    path, directory = moe_gguf(arch, False), tiny_checkpoint(arch)
    got, expected = ModelConfig.from_hf(gguf_to_hf_config(open_gguf(path))), ModelConfig.from_hf(hf_config(directory))
    same = {"rms_norm_eps": None, "torch_dtype": None, "router_aux_loss_coef": None}  # a GGUF has no training fields
    if arch == "qwen2_moe":  # decoder_sparse_step=2 in the directory: the file's block 0 simply has no experts
        assert (got.decoder_sparse_step, got.mlp_only_layers) == (1, [0])
        same.update(decoder_sparse_step=None, mlp_only_layers=None)
    assert {**vars(got), **same} == {**vars(expected), **same}
    from_file = load_model(str(path), dtype="float32").model
    from_dir = load_model(str(directory), dtype="float32").model
    ids = torch.randint(3, TINY_VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(from_file.causal_logits(ids), from_dir.causal_logits(ids), rtol=0, atol=1e-5)
    prompt = ids[0, :7].tolist()
    assert _greedy(from_file, prompt, 12) == _greedy(from_dir, prompt, 12)


# ---- quantization="gguf" ------------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_gguf_moe_logits_are_close_to_float32_on_the_same_blocks(moe_gguf, arch):
    path = moe_gguf(arch, True)
    quantized, full = load_model(str(path), quantization="gguf").model, load_model(str(path), dtype="float32").model
    moe = [m for m in quantized.modules() if isinstance(m, SparseMoE)]
    assert moe and all(type(m) is GGUFSparseMoE and type(m.experts) is GGUFExperts and type(m.gate) is InvariantLinear
                       for m in moe)
    assert all((m.shared_expert_gate is None) == (arch == "mixtral") for m in moe)
    ids = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, logits = full.causal_logits(ids), quantized.causal_logits(ids)
    # int8 activations cost each matmul ~0.5% (tests/test_gguf_path.py): measured over 3 x 96 positions, median
    # 1.3-1.4%, 95th percentile 1.7-2.1%; where a token's router scores sit close it may pick another expert
    # (Mixtral's top-2 of 4: 1-2 positions of 96, up to 55% there), so no bound on the max
    error = ((logits - expected).norm(dim=-1) / expected.norm(dim=-1)).flatten()
    assert error.median() < 0.02 and error.quantile(0.95) < 0.03, (error.median(), error.quantile(0.95))
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9  # measured 0.96-0.98


def _alone_in_fives_and_together(fn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn's rows of x computed one at a time, five at a time and all at once."""
    with torch.inference_mode():
        return (torch.cat([fn(x[i:i + 1], i, i + 1) for i in range(len(x))]),
                torch.cat([fn(x[i:i + 5], i, i + 5) for i in range(0, len(x), 5)]), fn(x, 0, len(x)))


@needs_kernels
def test_a_tokens_moe_output_is_bit_identical_whatever_shares_the_step(moe_gguf):
    """(c) the whole layer (router, routing, experts, shared expert and its gate) and the experts alone, with the
    file's Q4_1 experts and with Q4_1 gate/up + Q8_0 down blocks (those checked against kernels/moe.py on the
    dequantized weights too): a token's row is the same alone, in fives and among 40, to the bit."""
    from kernels import get_backend
    from kernels.moe import fused_moe
    ops = get_backend("cpu", torch.device("cpu"))
    path = moe_gguf("qwen2_moe", True)
    layer = load_model(str(path), quantization="gguf").model.layers[1].mlp
    assert isinstance(layer, GGUFSparseMoE) and layer.shared_expert_gate is not None
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    alone, fives, together = _alone_in_fives_and_together(lambda rows, i, j: layer(rows, ops), x)
    assert torch.equal(alone, together) and torch.equal(fives, together)

    reader = open_gguf(path)
    quantized = gguf_quantized(reader, gguf_to_hf_config(reader))
    w13, w2 = (p.detach() for p in load_model(str(path), dtype="float32").model.layers[1].mlp.experts.parameters())
    q, d = q8_0_from_float(w2.reshape(-1, w2.shape[-1]), exact=False)
    gate, up = (quantized[f"model.layers.1.mlp.experts.{part}"] for part in ("gate_proj", "up_proj"))
    gate_up = QuantizedWeight("q4_1", *(torch.cat(pair, 1) for pair in ((gate.q, up.q), (gate.d, up.d),
                                                                        (gate.m, up.m))))
    mixed = GGUFExperts(gate_up, QuantizedWeight("q8_0", q.view(w2.shape), d.half().view(*w2.shape[:2], -1), None))
    assert (mixed.kind13, mixed.kind2) == ("q4_1", "q8_0")
    with torch.inference_mode():
        weights, ids = invariant_route(layer.gate(x), 4, False)
    alone, fives, together = _alone_in_fives_and_together(
        lambda rows, i, j: mixed(rows, weights[i:j], ids[i:j], ops), x)
    assert torch.equal(alone, together) and torch.equal(fives, together)
    expected = fused_moe(x, w13, w2, weights, ids)
    assert ((together - expected).norm(dim=-1) / expected.norm(dim=-1)).max() < 0.03  # int8 activations


@pytest.mark.slow
@needs_kernels
def test_a_q4_1_moe_gguf_serves_the_same_tokens_and_logprobs_however_batched(moe_gguf):
    """(b) alone (eager steps), together (compiled decode step), and in prefill chunks of 5 with too few KV blocks
    for all (preemption: decoded tokens computed again in a prefill): the same greedy tokens and top-3 logprobs to
    the last bit."""
    from engine import LLM, SamplingParams
    path = str(moe_gguf("qwen2_moe", True))
    prompts = [torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (1, 6, 17, 30, 41)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)

    def served(outputs) -> list[list[tuple[int, dict]]]:
        return [list(zip(o.outputs[0].token_ids, o.outputs[0].logprobs)) for o in outputs]

    def llm(**kw) -> LLM:
        kw.setdefault("num_kv_blocks", 64)
        return LLM(path, quantization="gguf", max_model_len=128, enable_prefix_caching=False, **kw)

    eager = llm(enforce_eager=True)
    assert eager.engine.runner.backend.name == "cpu"
    alone = [served(eager.generate([p], params, use_tqdm=False))[0] for p in prompts]
    assert all(len(steps) == 12 for steps in alone)
    together = llm()
    assert together.engine.runner.decode_step is not None
    assert served(together.generate(prompts, params, use_tqdm=False)) == alone
    computed = sum(len(p) + 12 - 1 for p in prompts)  # every prompt token and every decoded token but the last
    assert {layer: sum(load) for layer, load in together.engine.expert_load().items()} == {1: 4 * computed}
    tight = llm(max_num_batched_tokens=5, num_kv_blocks=8)
    assert served(tight.generate(prompts, params, use_tqdm=False)) == alone
    assert tight.engine.num_preemptions > 0


@needs_kernels
def test_the_cpu_path_measurement_builds_the_gguf_moe_path(moe_gguf):
    from engine.path_choice import eligible, measure
    from kernels import get_backend
    from models.loading import read_checkpoint
    checkpoint = read_checkpoint(str(moe_gguf("qwen2_moe", True)))
    assert "gguf" in eligible(checkpoint)
    result = measure("gguf", checkpoint, get_backend("cpu", torch.device("cpu")))
    assert result.error is None and result.invariant, result


# ---- (d) metadata that does not fit ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("change, message", [
    ({"expert_used_count": 9}, r"\.expert_used_count must be an integer from 1 to \w+\.expert_count"),
    ({"expert_count": 0}, r"\.expert_count must be a positive integer"),
    ({"drop_expert": True}, r"blk\.\d\.ffn_\w+_exps\.weight holds \d experts but \w+\.expert_count is \d"),
])
def test_inconsistent_expert_metadata_is_refused_naming_the_field(tiny_checkpoint, tmp_path, arch, change, message):
    path = write_moe_gguf(tiny_checkpoint(arch), tmp_path / "bad.gguf", False, **change)
    with pytest.raises(ValueError, match=message):
        load_config(str(path))


def test_the_written_file_follows_llama_cpps_layout(moe_gguf):
    reader = open_gguf(moe_gguf("qwen2_moe", True))
    tensors = {t.name: t for t in reader.tensors}
    assert [int(d) for d in tensors["blk.1.ffn_gate_exps.weight"].shape] == [64, 32, 8]  # ne: H, I, E
    assert [int(d) for d in tensors["blk.1.ffn_down_exps.weight"].shape] == [32, 64, 8]
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors
    assert gguf_to_hf_config(reader)["mlp_only_layers"] == [0]
