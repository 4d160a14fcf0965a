"""Constrained decoding: which schemas are refused, the logit mask, and the engine with constrained and
unconstrained requests in one batch (tiny random model: a constraint must hold whatever the weights)."""
import json
import re

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutputsParams
from engine.structured_output import Grammars, check_enforceable, check_json_schema

ENUM_CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                              "days": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["city", "days"]}


@pytest.mark.parametrize("schema,words", [
    ({"type": "nonsense"}, "not a valid JSON schema"),
    ({"type": "object", "required": "city"}, "not a valid JSON schema"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be an object"),
])
def test_invalid_schemas_are_refused_with_the_reason(schema, words):
    with pytest.raises(ValueError, match=words):
        check_json_schema(schema)


@pytest.mark.parametrize("schema,keyword", [
    ({"not": {"type": "string"}}, "'not'"),
    ({"type": "object", "properties": {"a": {"if": {"minimum": 1}, "then": {"maximum": 3}}}}, "'if'"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "'allOf'"),
    ({"type": "string", "format": "color"}, "'color'"),
    ({"$defs": {"x": {"contentEncoding": "base64"}}, "$ref": "#/$defs/x"}, "'contentEncoding'"),
])
def test_keywords_the_grammar_would_ignore_are_refused(schema, keyword):
    with pytest.raises(ValueError, match=keyword):
        check_enforceable(schema)


def test_property_names_that_look_like_keywords_are_fine():
    check_enforceable({"type": "object", "properties": {"not": {"type": "string"}, "if": {"enum": ["not"]}},
                       "required": ["not"]})


@pytest.fixture(scope="module")
def grammars(smollm_tokenizer):
    return Grammars(smollm_tokenizer, smollm_tokenizer.vocab_size, smollm_tokenizer.eos_token_ids)


def test_smollm_vocabulary_is_byte_level_and_special_tokens_spell_nothing(smollm_tokenizer):
    vocab, kind, prefix_space = smollm_tokenizer.grammar_vocab()
    assert kind == "byte_level" and not prefix_space and len(vocab) == smollm_tokenizer.vocab_size
    im_start = smollm_tokenizer.token_to_id("<|im_start|>")
    assert vocab[im_start] == "" and vocab[smollm_tokenizer.encode("Paris", add_special_tokens=False)[0]]


def test_mask_leaves_only_allowed_tokens_and_unconstrained_rows_alone(grammars, smollm_tokenizer):
    choice = StructuredOutputsParams(choice=["yes", "no"])
    (matcher,) = grammars.matchers(choice, 1)
    logits = torch.randn(2, grammars.vocab_size)
    before = logits.clone()
    grammars.mask(logits, [matcher, None])
    assert torch.equal(logits[1], before[1])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    texts = {smollm_tokenizer.decode([t]) for t in allowed}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert torch.equal(logits[0][allowed], before[0][allowed])


def test_compile_errors_are_value_errors_without_cpp_locations(grammars):
    with pytest.raises(ValueError, match="cannot compile the regex constraint") as info:
        grammars.compile(StructuredOutputsParams(regex="[a-z"))
    assert ".cc:" not in str(info.value)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=256, max_model_len=256)


PLAIN = ["The quick brown fox", "Hello, world!", "def f(x):", "Paged attention stores"]


def test_constrained_requests_hold_their_grammar_and_leave_batch_neighbours_unchanged(tiny_llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in tiny_llm.generate(PLAIN, greedy, use_tqdm=False)]
    constrained = [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=ENUM_CITY)),
        SamplingParams(temperature=0.9, seed=1, n=3, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}")),
        SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
    ]
    outs = tiny_llm.generate(PLAIN[:2] + ["Q:"] * 3 + PLAIN[2:], [greedy] * 2 + constrained + [greedy] * 2,
                             use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:2] + outs[5:]] == alone
    city = outs[2].outputs[0]
    assert city.finish_reason == "stop"
    jsonschema.validate(json.loads(city.text), ENUM_CITY)
    assert [bool(re.fullmatch(r"[0-9]{3}-[a-c]{2}", o.text)) for o in outs[3].outputs] == [True] * 3
    assert outs[4].outputs[0].text in ("yes", "no")


def test_a_constraint_that_does_not_compile_is_refused_before_anything_is_queued(tiny_llm):
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "strin"}))
    with pytest.raises(ValueError, match="strin"):
        tiny_llm.generate(["a", "b"], [SamplingParams(max_tokens=2), bad], use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_offline_chat_with_a_named_tool_returns_a_parsed_valid_call(smollm_gguf):
    # eager: the tool-call path is what is checked here; a compile for these shapes adds ~40 s to the suite
    llm = LLM(str(smollm_gguf), max_model_len=1024, kv_cache_memory="64MiB", enforce_eager=True)
    tools = [{"type": "function", "function": {"name": "plan_trip", "parameters": ENUM_CITY}},
             {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]
    out = llm.chat([{"role": "user", "content": "Plan a trip to Rome for three days."}],
                   SamplingParams(temperature=0, max_tokens=80), tools=tools,
                   tool_choice={"type": "function", "function": {"name": "plan_trip"}}, use_tqdm=False)[0].outputs[0]
    (call,) = out.tool_calls
    assert call.name == "plan_trip" and out.finish_reason == "stop"
    jsonschema.validate(json.loads(call.arguments), ENUM_CITY)
    with pytest.raises(ValueError, match="not among the tools"):
        llm.chat([{"role": "user", "content": "x"}], tools=tools,
                      tool_choice={"type": "function", "function": {"name": "missing"}}, use_tqdm=False)
