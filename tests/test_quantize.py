"""int8 output head (quantization="int8", CPU): the tied head becomes an fbgemm int8 Linear, the rest stays float32,
the logits stay close to float32's, and settings it cannot honour are refused."""
import pytest
import torch

from models.loading import load_model


@pytest.fixture(scope="module")
def models():
    return load_model("default", "float32"), load_model("default", quantization="int8")


def test_int8_logits_follow_float32(models):
    full, int8 = models
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(int8.model.lm_head, dynamic) and full.model.lm_head is None  # tied in the checkpoint
    assert [type(m) for m in int8.model.layers[0].modules() if isinstance(m, (torch.nn.Linear, dynamic))] == \
        [torch.nn.Linear] * 4  # qkv, o, gate_up, down stay float32
    ids = full.tokenizer.encode("The quick brown fox jumps over the lazy dog. Python is a programming language "
                                "that lets you work quickly and integrate systems more effectively.")
    with torch.no_grad():
        a = full.model.causal_logits(torch.tensor([ids]))[0]
        b = int8.model.causal_logits(torch.tensor([ids]))[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert agree >= 0.95 and cosine.min() > 0.98, (agree, cosine.min())


@pytest.mark.parametrize("kwargs,words", [({"quantization": "int4"}, "quantization must be"),
                                          ({"quantization": "int8", "dtype": "bfloat16"}, "float32 activations")])
def test_unsupported_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        load_model("default", **kwargs)
