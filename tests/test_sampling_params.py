"""SamplingParams rejects out-of-range values with errors that name the field."""
import pytest

from engine import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"n": 0}, "n"), ({"min_p": 1.5}, "min_p"), ({"max_tokens": -1}, "max_tokens"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"stop": ["ok", ""]}, "stop"), ({"logit_bias": {3: 200.0}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"seed": 1.5}, "seed"),
])
def test_invalid_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams(top_k=-1, stop="###")
    assert p.top_k == 0 and p.stop_list == ["###"] and not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
