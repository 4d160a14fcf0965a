"""A thinking model's reasoning, split off its answer in every API: a tiny Qwen3-shaped checkpoint with a thinking
chat template, trained in a second (tests/thinking_model.py) to answer its two prompts with `<think>…</think>` first. Streamed and
non-streamed answers are the same, a json_schema applies after `</think>` (the reasoning stays free), and
enable_thinking=false gives no reasoning."""
import json

import jsonschema
import openai
import pytest

from tests.conftest import RunningServer
from tests.thinking_model import ANSWERS, TEMPLATE
from text.reasoning import Reasoning, StreamingReasoning, reasoning_for, split

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_split_and_stream_agree_on_every_cut():
    inside, outside = Reasoning("<think>", "</think>", True), Reasoning("<think>", "</think>")
    for text, r in [("<think>\nhmm\n</think>\n\nYes.", outside), ("hmm</think>Yes.", inside),
                    ("No tags.", outside), ("<think>unfinished", outside), ("<th", outside)]:
        want = split(text, r)
        for step in (1, 2, 3, 5):
            stream, got = StreamingReasoning(r), ["", ""]
            for i in range(0, len(text), step):
                a, b = stream.feed(text[i:i + step])
                got[0], got[1] = got[0] + a, got[1] + b
            a, b = stream.feed("", final=True)
            assert (got[0] + a, got[1] + b) == (want[0] or "", want[1]), (text, step)
    assert reasoning_for("auto", TEMPLATE, "<|im_start|>assistant\n") == outside
    assert reasoning_for("auto", TEMPLATE, "<|im_start|>assistant\n<think>\n\n</think>\n\n") is None
    assert reasoning_for("auto", "{{ messages }}", "x") is None and reasoning_for("none", TEMPLATE, "") is None
    with pytest.raises(ValueError, match="reasoning parser"):
        reasoning_for("klingon", TEMPLATE, "")


def _client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=60)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_separates_reasoning_streamed_as_not(thinking_server):
    client = _client(thinking_server)
    thought, answer = ANSWERS["Hi"]
    message = client.chat.completions.create(model="thinker", messages=_user("Hi"), max_tokens=60,
                                             temperature=0).choices[0].message
    assert message.content == answer
    assert message.reasoning_content == thought and message.model_extra["reasoning"] == thought
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="thinker", messages=_user("Hi"), max_tokens=60, temperature=0,
                                                stream=True):
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None:
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
    assert (reasoning, content) == (thought, answer)
    off = client.chat.completions.create(model="thinker", messages=_user("Hi"), max_tokens=8, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.model_extra.get("reasoning_content") is None


def test_json_schema_applies_after_the_reasoning(thinking_server):
    client = _client(thinking_server)
    response = client.chat.completions.create(
        model="thinker", messages=_user("Give JSON"), max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    message = response.choices[0].message
    assert message.reasoning_content == ANSWERS["Give JSON"][0]
    jsonschema.validate(json.loads(message.content), PERSON)
    plain = client.responses.create(model="thinker", input="Give JSON", max_output_tokens=60, temperature=0,
                                    text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(plain.output_text), PERSON)
    assert plain.output[0].type == "reasoning" and plain.output[0].content[0].text == ANSWERS["Give JSON"][0]


def test_responses_api_gives_a_reasoning_item_streamed_as_not(thinking_server):
    client = _client(thinking_server)
    thought, answer = ANSWERS["Hi"]
    plain = client.responses.create(model="thinker", input="Hi", max_output_tokens=60, temperature=0)
    assert [item.type for item in plain.output] == ["reasoning", "message"]
    assert plain.output[0].content[0].text == thought and plain.output_text == answer
    assert 0 < plain.usage.output_tokens_details.reasoning_tokens < plain.usage.output_tokens
    with client.responses.stream(model="thinker", input="Hi", max_output_tokens=60, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        streamed = stream.get_final_response()
    assert "".join(deltas) == thought
    assert _without_ids(streamed.output) == _without_ids(plain.output)


def _without_ids(items) -> list[dict]:
    """Output items without their ids and the `parsed` field the SDK's stream helper adds."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("id", "parsed")}
        return [strip(v) for v in value] if isinstance(value, list) else value
    return [strip(item.model_dump()) for item in items]
