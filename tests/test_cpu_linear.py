"""CPULinear (models/cpu_linear.py): the transposed product for small batches gives F.linear's values, larger
batches fall back to F.linear, and the float32 CPU engine swaps every projection and the tied head for one."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import LLM
from models.cpu_linear import MAX_ROWS, CPULinear, use_cpu_linears
from models.loading import load_model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 7, MAX_ROWS, MAX_ROWS + 1, 300])
def test_values_match_f_linear(rows, bias):
    torch.manual_seed(rows)
    base = nn.Linear(96, 160, bias=bias)
    fast = CPULinear.sharing(base)
    x = torch.randn(rows, 96)
    out = fast(x)
    assert out.shape == (rows, 160)
    torch.testing.assert_close(out, F.linear(x, base.weight, base.bias), rtol=1e-5, atol=1e-5)
    if 1 < rows <= MAX_ROWS:
        assert not out.is_contiguous()  # the transposed view, which the model's head split still views
        assert out[:, :64].view(rows, 2, 32).shape == (rows, 2, 32)
    assert fast(x.view(1, rows, 96)).shape == (1, rows, 160)  # other ranks take F.linear


def test_swap_shares_the_weights_and_keeps_the_logits(tiny_checkpoint):
    loaded = load_model(str(tiny_checkpoint("llama")), "float32")
    model = loaded.model
    ids = torch.tensor([[5, 9, 17, 3, 8, 11]])
    with torch.no_grad():
        before = model.causal_logits(ids)
        tied = model.lm_head is None
        count = use_cpu_linears(model)
        after = model.causal_logits(ids)
    assert count == 4 * len(model.layers) + 1
    assert all(type(m) is not nn.Linear for m in model.modules())
    if tied:
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_engine_swaps_only_float32_on_the_torch_path(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    fp32 = LLM(path, dtype="float32", num_kv_blocks=16).engine.runner.model
    bf16 = LLM(path, dtype="bfloat16", num_kv_blocks=16).engine.runner.model
    assert isinstance(fp32.layers[0].mlp.down_proj, CPULinear)
    assert type(bf16.layers[0].mlp.down_proj) is nn.Linear


def test_residual_stream_stays_contiguous_after_a_transposed_sublayer_output():
    # kernels.reference.rms_norm adds residual + x in that order so the sum keeps the residual's row layout
    from kernels.reference import rms_norm
    sublayer_out = CPULinear.sharing(nn.Linear(32, 48, bias=False))(torch.randn(4, 32))
    assert not sublayer_out.is_contiguous()
    normed, residual = rms_norm(sublayer_out, torch.ones(48), 1e-5, residual=torch.randn(4, 48))
    assert residual.is_contiguous() and normed.is_contiguous()


def test_the_head_returns_rows_for_the_sampler(tiny_checkpoint):
    model = load_model(str(tiny_checkpoint("llama")), "float32").model
    use_cpu_linears(model)
    assert model.compute_logits(torch.randn(3, model.config.hidden_size)).is_contiguous()
