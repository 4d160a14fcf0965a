"""Opt-in CPU quantization (models/quantize.py). int4: 4-bit projections whose dequantized weights are what the
float32 path multiplies (for the default Q4_1 GGUF, exactly the loaded weights), rows independent of the batch
on the int4 path, logits close to float32's. int8: the tied head becomes an fbgemm int8 Linear, the rest stays
float32. Settings neither can honour are refused."""
import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams
from models import quantize
from models.loading import load_model
from tests.conftest import TINY_VOCAB
from tests.test_engine_fidelity import shared_prefix_prompts

TEXT = ("The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work quickly "
        "and integrate systems more effectively. A paged KV cache keeps every sequence's keys and values in "
        "fixed-size blocks, so memory is handed out as sequences grow and returned when they finish.")


@pytest.fixture(scope="module")
def full():
    return load_model("default", "float32")


@pytest.fixture(scope="module")
def int4():
    return load_model("default", quantization="int4")


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item(), cosine.min().item()


@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_paths(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=bias)
    q = quantize.Int4Linear.quantizing(linear)
    w = q.weight.detach()
    levels = w.view(48, 3, 32)  # every group holds at most 16 values, evenly spaced from its minimum
    for group in levels.flatten(0, 1)[:20]:
        steps = torch.diff(group.unique())
        assert len(steps) <= 15 and torch.allclose(steps / steps.min(), (steps / steps.min()).round(), atol=1e-3)
    assert (w - linear.weight).abs().max() <= (linear.weight.abs().max() / 15)  # round to nearest of 16 levels
    x = torch.randn(quantize.INT4_MAX_ROWS + 1, 96)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, w, linear.bias)
        large = q(x)  # above the row limit: float32 on the dequantized weights
        assert torch.allclose(large, want, atol=1e-5)
        small = q(x[:quantize.INT4_MAX_ROWS])  # the int4 kernel, bfloat16 activations
        assert not torch.equal(small, want[:quantize.INT4_MAX_ROWS])
        assert torch.allclose(small, want[:quantize.INT4_MAX_ROWS], atol=0.05, rtol=0.02)
        # each row's result is the same whatever else is in the step (up to the row limit)
        assert all(torch.equal(q(x[i:i + 1]), small[i:i + 1]) for i in range(quantize.INT4_MAX_ROWS))


def test_int4_requantizes_the_q4_1_gguf_without_loss(full, int4):
    swapped = [m for m in int4.model.modules() if isinstance(m, quantize.Int4Linear)]
    assert len(swapped) == 2 * full.config.num_layers * 2  # qkv, o, gate_up, down in every layer
    for name, module in int4.model.named_modules():
        if isinstance(module, quantize.Int4Linear):
            assert torch.equal(module.weight, full.model.get_submodule(name).weight), name
    assert int4.model.lm_head is None and int4.model.state_dict().keys() == full.model.state_dict().keys()


def test_int4_logits_follow_float32(full, int4, monkeypatch):
    ids = torch.tensor([full.tokenizer.encode(TEXT)])
    monkeypatch.setattr(quantize, "INT4_MAX_ROWS", 1 << 30)  # every row through the int4 kernel
    with torch.no_grad():
        a = full.model.causal_logits(ids)[0]
        b = int4.model.causal_logits(ids)[0]
    agree, cosine = _agreement(a, b)
    assert agree >= 0.97 and cosine > 0.99, (agree, cosine)
    assert not torch.equal(a, b)  # the int4 path did run


def test_int8_logits_follow_float32(full):
    int8 = load_model("default", quantization="int8")
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(int8.model.lm_head, dynamic) and full.model.lm_head is None  # tied in the checkpoint
    assert [type(m) for m in int8.model.layers[0].modules() if isinstance(m, (torch.nn.Linear, dynamic))] == \
        [torch.nn.Linear] * 4  # qkv, o, gate_up, down stay float32
    ids = full.tokenizer.encode(TEXT)
    with torch.no_grad():
        a = full.model.causal_logits(torch.tensor([ids]))[0]
        b = int8.model.causal_logits(torch.tensor([ids]))[0]
    agree, cosine = _agreement(a, b)
    assert agree >= 0.75 and cosine > 0.98, (agree, cosine)  # measured 0.81 and 0.982: int4 is the closer one


@pytest.mark.parametrize("kwargs,words", [({"quantization": "int3"}, "quantization must be"),
                                          ({"quantization": "int8", "dtype": "bfloat16"}, "float32 activations"),
                                          ({"quantization": "int4", "dtype": "bfloat16"}, "float32 activations")])
def test_unsupported_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        load_model("default", **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biased q/k/v projections
def test_int4_engine_decode_rows_do_not_depend_on_the_batch(tiny_checkpoint, arch):
    """Decode steps of up to INT4_MAX_ROWS rows run the int4 kernel, whose rows are independent: 8 prompts
    alone and together give the same greedy tokens (prompts over the row limit prefill in float32 either way)."""
    prompts = [p for p in shared_prefix_prompts(TINY_VOCAB) if len(p) > quantize.INT4_MAX_ROWS][:8]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(str(tiny_checkpoint(arch)), quantization="int4", enable_prefix_caching=False, num_kv_blocks=64,
              max_model_len=160)
    assert any(isinstance(m, quantize.Int4Linear) for m in llm.engine.runner.model.modules())
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert together == alone and all(len(t) == 12 for t in alone)


def test_int4_refuses_the_triton_backend(tiny_checkpoint):
    with pytest.raises(ValueError, match="runs with the CPU backends"):
        LLM(str(tiny_checkpoint("llama")), quantization="int4", attention_backend="triton")
