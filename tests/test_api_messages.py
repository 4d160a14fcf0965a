"""Anthropic's Messages API through the official `anthropic` SDK (raw HTTP for bad input) against the real server:
messages, streams that add up to them, tools and tool results, count_tokens, stop sequences, prefill, auth by either
header, and Anthropic's error shape."""
import json

import anthropic
import httpx
import jsonschema
import pytest

from engine import CompletionOutput
from server.constraints import OutputPlan
from server.messages import _Reply
from tests.thinking_model import ANSWERS

pytestmark = pytest.mark.slow

MODEL = "smollm2"
FRANCE = [{"role": "user", "content": "Name the capital of France."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris?"}]
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 12},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}
CALL = {"type": "tool_use", "id": "toolu_0123", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}


def _after_call(result) -> list[dict]:
    return [*ASK_WEATHER, {"role": "assistant", "content": [CALL]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": CALL["id"], "content": result}]}]


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    headers = {"x-api-key": server.api_key, "anthropic-version": "2023-06-01", "anthropic-beta": "whatever-2025"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as c:
        yield c


# the SDK (2.x) no longer takes sampling settings as arguments; the API still does
GREEDY = {"extra_body": {"temperature": 0}}


def _create(client, messages, **kw):
    return client.messages.create(model=MODEL, messages=messages, **{**GREEDY, "max_tokens": 16, **kw})


def _count(client, messages, **kw) -> int:
    return client.messages.count_tokens(messages=messages, **{"model": MODEL, **kw}).input_tokens


def _shape(message) -> dict:
    """A message without what differs between two runs (the ids)."""
    return {"model": message.model, "role": message.role, "stop_reason": message.stop_reason,
            "stop_sequence": message.stop_sequence, "usage": (message.usage.input_tokens, message.usage.output_tokens),
            "content": [(b.type, getattr(b, "text", None), getattr(b, "thinking", None), getattr(b, "name", None),
                         getattr(b, "input", None)) for b in message.content]}


def _text(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_create_returns_an_anthropic_message(client):
    reply = _create(client, FRANCE, max_tokens=24)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL
    assert reply.id.startswith("msg_")
    assert [b.type for b in reply.content] == ["text"] and "Paris" in reply.content[0].text
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert 0 < reply.usage.output_tokens < 24 and reply.usage.input_tokens > 0
    short = _create(client, FRANCE, max_tokens=3)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


@pytest.mark.parametrize("messages,kw", [
    (FRANCE, {"max_tokens": 24}),
    (FRANCE, {"max_tokens": 24, "stop_sequences": ["Paris"]}),
    (ASK_WEATHER, {"max_tokens": 64, "tools": [WEATHER], "tool_choice": {"type": "any"}}),
], ids=["text", "stop-sequence", "tool-use"])
def test_stream_adds_up_to_the_created_message_at_temperature_0(client, messages, kw):
    full = _create(client, messages, **kw)
    with client.messages.stream(model=MODEL, messages=messages, **GREEDY, **kw) as stream:
        events = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert _shape(streamed) == _shape(full)
    assert streamed.id.startswith("msg_") and streamed.id != full.id
    raw = [e for e in events if e in ("message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "message_delta", "message_stop")]
    assert raw[0] == "message_start" and raw[-2:] == ["message_delta", "message_stop"]
    assert raw.count("content_block_start") == raw.count("content_block_stop") == len(full.content)


@pytest.mark.parametrize("tool_choice", [{"type": "any", "disable_parallel_tool_use": True},
                                         {"type": "tool", "name": "get_weather"}], ids=["any", "named"])
def test_forced_tool_use_has_input_valid_for_the_schema(client, tool_choice):
    reply = _create(client, ASK_WEATHER, tools=[WEATHER], tool_choice=tool_choice, max_tokens=64)
    (call,) = [b for b in reply.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])
    assert reply.stop_reason == "tool_use" and reply.content[-1] is call


def test_tool_result_round_trip_answers_and_puts_the_result_in_the_prompt(client, http, server):
    reply = _create(client, _after_call("18 degrees and sunny"), tools=[WEATHER], max_tokens=16)
    assert reply.stop_reason in ("end_turn", "max_tokens") and _text(reply).strip()
    short = _count(client, _after_call("18 degrees"), tools=[WEATHER])
    longer = _count(client, _after_call("18 degrees" + ", sunny, with a light wind from the west" * 5),
                    tools=[WEATHER])
    assert longer >= short + 25
    assert _count(client, _after_call([{"type": "text", "text": "18 degrees"}]), tools=[WEATHER]) == short
    # the same conversation in OpenAI's shape renders to the same prompt
    openai_messages = [*ASK_WEATHER,
                       {"role": "assistant", "content": "", "tool_calls": [{"id": CALL["id"], "type": "function",
                        "function": {"name": CALL["name"], "arguments": json.dumps(CALL["input"])}}]},
                       {"role": "tool", "tool_call_id": CALL["id"], "content": "18 degrees"}]
    tool = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                             "parameters": WEATHER["input_schema"]}}
    tokenized = http.post("/tokenize", headers=server.headers,
                          json={"model": MODEL, "messages": openai_messages, "tools": [tool]})
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["count"] == short


def test_output_format_makes_the_answer_json_valid_for_the_schema(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    reply = _create(client, FRANCE, max_tokens=24, output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(_text(reply)), schema)
    assert reply.stop_reason == "end_turn"


def test_count_tokens_equals_the_usage_input_tokens(client):
    kw = {"system": [{"type": "text", "text": "You answer briefly."}], "tools": [WEATHER],
          "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                       {"role": "user", "content": [{"type": "text", "text": "Name the capital of France."}]}]}
    count = client.messages.count_tokens(model=MODEL, **kw).input_tokens
    assert _create(client, max_tokens=8, **kw).usage.input_tokens == count
    assert _count(client, kw["messages"], system=kw["system"], tools=[WEATHER], tool_choice={"type": "none"}) < count


def test_equivalent_requests_render_the_same_prompt(client):
    base = _count(client, FRANCE, system="You answer briefly.", tools=[WEATHER])
    # a system-role message (some clients send one) folds into the system prompt
    assert _count(client, [{"role": "system", "content": "You answer briefly."}, *FRANCE], tools=[WEATHER]) == base
    # server tools are left out (with a warning), not refused
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
    assert _count(client, FRANCE, system="You answer briefly.", tools=[WEATHER, server_tool]) == base
    # earlier reasoning is not part of the prompt
    said = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *FRANCE]
    thought = [said[0], {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "The user greets me.", "signature": "abc"},
        {"type": "redacted_thinking", "data": "xyz"}, {"type": "text", "text": "Hello!"}]}, *FRANCE]
    assert _count(client, thought) == _count(client, said)
    # SmolLM2's template does not read enable_thinking: the setting is accepted and changes nothing
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}):
        assert _count(client, FRANCE, system="You answer briefly.", tools=[WEATHER], thinking=thinking) == base


def test_stop_sequence_ends_the_answer_before_it(client):
    full = _text(_create(client, FRANCE, max_tokens=24))
    assert "Paris" in full
    reply = _create(client, FRANCE, max_tokens=24, stop_sequences=["nothing like this", "Paris"])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "Paris"
    assert _text(reply) == full[:full.index("Paris")]


def test_a_final_assistant_turn_is_continued(client, http, server):
    prefill = "The capital of France is"
    with_prefill = [*FRANCE, {"role": "assistant", "content": prefill}]
    reply = _create(client, with_prefill, max_tokens=8)
    assert "Paris" in _text(reply) and not _text(reply).startswith(prefill)
    # the prompt is the rendered conversation with the prefill after the assistant's generation prompt
    ids = http.post("/tokenize", headers=server.headers, json={"model": MODEL, "messages": FRANCE}).json()["tokens"]
    rendered = http.post("/detokenize", headers=server.headers, json={"model": MODEL, "tokens": ids}).json()["prompt"]
    expected = http.post("/tokenize", headers=server.headers, json={
        "model": MODEL, "prompt": rendered + prefill, "add_special_tokens": False}).json()["count"]
    assert _count(client, with_prefill) == reply.usage.input_tokens == expected


def test_max_tokens_beyond_the_context_is_what_the_context_leaves(client):
    # Claude Code asks for 32000 tokens whatever the context (2048 here): accepted, not a 400
    reply = _create(client, ASK_WEATHER, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
                    max_tokens=32000)
    assert reply.stop_reason == "tool_use"
    # running into the context's end is told apart from running into max_tokens
    ran_out = CompletionOutput(0, "word word", [1, 2], finish_reason="length")
    for clamped, reason in ((True, "model_context_window_exceeded"), (False, "max_tokens")):
        assert _Reply("msg_1", MODEL, OutputPlan(), 2046, clamped).message(ran_out)["stop_reason"] == reason


def test_reasoning_is_a_thinking_block_streamed_as_not(thinking_server):
    client = anthropic.Anthropic(base_url=thinking_server.base_url, api_key=thinking_server.api_key, max_retries=0,
                                 timeout=60)
    thought, answer = ANSWERS["Hi"]
    hi = [{"role": "user", "content": "Hi"}]
    full = client.messages.create(model="thinker", messages=hi, max_tokens=60, **GREEDY)
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in full.content] == [("thinking", thought),
                                                                                         ("text", answer)]
    assert full.content[0].signature == "" and full.stop_reason == "end_turn"
    with client.messages.stream(model="thinker", messages=hi, max_tokens=60, **GREEDY) as stream:
        thinking = "".join(e.thinking for e in stream if e.type == "thinking")
        streamed = stream.get_final_message()
    assert thinking == thought and _shape(streamed) == _shape(full)
    # the earlier reasoning sent back is not part of the prompt; thinking disabled gives none
    again = [*hi, {"role": "assistant", "content": [{"type": "thinking", "thinking": thought, "signature": ""},
                                                    {"type": "text", "text": answer}]}, *hi]
    assert _count(client, again, model="thinker") == _count(client, [*hi, {"role": "assistant", "content": answer},
                                                                     *hi], model="thinker")
    off = client.messages.create(model="thinker", messages=hi, max_tokens=8, thinking={"type": "disabled"}, **GREEDY)
    assert [b.type for b in off.content] in ([], ["text"])


def _assert_anthropic_error(response: httpx.Response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}
    error = body["error"]
    assert set(error) == {"type", "message"} and error["message"] and "Traceback" not in error["message"]
    assert error["type"] == (kind or {400: "invalid_request_error", 401: "authentication_error",
                                      404: "not_found_error", 405: "invalid_request_error"}[status])
    return error


def test_api_key_by_x_api_key_or_bearer(server, client):
    url = f"{server.base_url}/v1/messages/count_tokens"
    body = {"model": MODEL, "messages": FRANCE}
    expected = _count(client, FRANCE)  # the SDK sends x-api-key
    bearer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {server.api_key}"})
    assert bearer.status_code == 200 and bearer.json() == {"input_tokens": expected}
    assert anthropic.Anthropic(base_url=server.base_url, auth_token=server.api_key, api_key=None,
                               max_retries=0).messages.count_tokens(model=MODEL, messages=FRANCE).input_tokens == expected
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
        _assert_anthropic_error(httpx.post(url, json=body, headers=headers), 401)
        _assert_anthropic_error(httpx.post(f"{server.base_url}/v1/messages", json={**body, "max_tokens": 8},
                                           headers=headers), 401)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, messages=FRANCE, max_tokens=8)


def body(**fields):
    return {"model": MODEL, "max_tokens": 8, "messages": FRANCE, **fields}


def user(*blocks):
    return [{"role": "user", "content": list(blocks)}]


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
LONG_TEXT = "word " * 2100  # more tokens than --max-model-len 2048

# (case id, json body, status, a text the message must hold or None)
BAD_BODIES = [
    ("max_tokens-missing", {"model": MODEL, "messages": FRANCE}, 400, "max_tokens"),
    ("max_tokens-0", body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-string", body(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens-float", body(max_tokens=2.5), 400, "max_tokens"),
    ("model-missing", {"max_tokens": 8, "messages": FRANCE}, 400, "model"),
    ("model-unknown", body(model="claude-sonnet-4-5"), 404, "claude-sonnet-4-5"),
    ("messages-missing", {"model": MODEL, "max_tokens": 8}, 400, "messages"),
    ("messages-not-a-list", body(messages="Hi"), 400, "messages"),
    ("messages-empty", body(messages=[]), 400, "messages"),
    ("role-unknown", body(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages[0].role"),
    ("content-number", body(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content"),
    ("block-unknown", body(messages=user({"type": "audio", "data": "x"})), 400, "messages[0].content[0]"),
    ("image", body(messages=user({"type": "text", "text": "What is this?"}, IMAGE)), 400, "messages[0].content[1]"),
    ("document", body(messages=user({"type": "document", "source": {"type": "text", "data": "x"}})), 400,
     "messages[0].content[0]"),
    ("image-in-tool-result", body(messages=[*ASK_WEATHER, {"role": "assistant", "content": [CALL]},
                                            *user({"type": "tool_result", "tool_use_id": CALL["id"],
                                                   "content": [IMAGE]})], tools=[WEATHER]),
     400, "messages[2].content[0].content[0]"),
    ("tool_use-input-not-object", body(messages=[*ASK_WEATHER, {"role": "assistant", "content": [
        {**CALL, "input": "Paris"}]}]), 400, "input"),
    ("tool_use-in-user-turn", body(messages=user(CALL)), 400, "messages[0].content[0]"),
    ("tool_result-in-assistant-turn", body(messages=[*FRANCE, {"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "x", "content": "y"}]}]), 400, "messages[1].content[0]"),
    ("system-number", body(system=42), 400, "system"),
    ("system-image", body(system=[IMAGE]), 400, "system"),
    ("temperature-2", body(temperature=2), 400, "temperature"),
    ("top_p-0", body(top_p=0), 400, "top_p"),
    ("top_k-negative", body(top_k=-1), 400, "top_k"),
    ("stream-string", body(stream="yes"), 400, "stream"),
    ("stop_sequences-string", body(stop_sequences="END"), 400, "stop_sequences"),
    ("stop_sequences-empty-string", body(stop_sequences=[""]), 400, "stop_sequences"),
    ("thinking-unknown", body(thinking={"type": "sometimes"}), 400, "thinking"),
    ("tool_choice-any-without-tools", body(tool_choice={"type": "any"}), 400, "tool_choice"),
    ("tool_choice-unknown-tool", body(tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}), 400,
     "nope"),
    ("tool_choice-tool-without-name", body(tools=[WEATHER], tool_choice={"type": "tool"}), 400, "tool_choice.name"),
    ("tool_choice-unknown-type", body(tools=[WEATHER], tool_choice={"type": "sometimes"}), 400, "tool_choice"),
    ("tool-invalid-schema", body(tools=[{**WEATHER, "input_schema": {"type": "objekt"}}]), 400,
     "tools[0]: not a valid JSON schema"),
    ("tool-schema-missing", body(tools=[{"name": "f", "description": "x"}]), 400, "input_schema"),
    ("tool-name-with-spaces", body(tools=[{**WEATHER, "name": "get weather"}]), 400, "name"),
    ("tools-same-name", body(tools=[WEATHER, WEATHER]), 400, "tools[1].name"),
    ("output-schema-invalid", body(output_config={"format": {"type": "json_schema", "schema": {"type": 5}}}), 400,
     "output_config.format.schema"),
    ("output-format-with-forced-tool", body(tools=[WEATHER], tool_choice={"type": "any"}, output_config={
        "format": {"type": "json_schema", "schema": {"type": "object"}}}), 400, "tool_choice"),
    ("prompt-too-long", body(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "context length"),
]

# what count_tokens does not check: fields it does not take (ignored), and the context's length
NOT_COUNTED = ("temperature-2", "top_p-0", "top_k-negative", "stream-string", "stop_sequences-string",
               "stop_sequences-empty-string", "prompt-too-long", "output-schema-invalid")


@pytest.mark.parametrize("case,request_body,status,names", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_body_gets_an_anthropic_error(http, case, request_body, status, names):
    error = _assert_anthropic_error(http.post("/v1/messages", json=request_body), status)
    assert names in error["message"], error
    if "stream" not in request_body:  # streamed, it fails the same way before any event
        response = http.post("/v1/messages", json={**request_body, "stream": True})
        assert _assert_anthropic_error(response, status) == error
    if "max_tokens" not in case:  # count_tokens reads the same prompt fields
        counted = http.post("/v1/messages/count_tokens",
                            json={k: v for k, v in request_body.items() if k != "max_tokens"})
        if case in NOT_COUNTED:
            assert counted.status_code == 200, counted.text
        else:
            assert _assert_anthropic_error(counted, status) == error


def test_malformed_requests_get_anthropic_errors_and_the_server_goes_on(http, client):
    error = _assert_anthropic_error(http.post("/v1/messages", content=b"{not json",
                                              headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"]
    _assert_anthropic_error(http.get("/v1/messages"), 405)
    _assert_anthropic_error(http.post("/v1/messages/nothing-here", json=body()), 404)
    assert _text(_create(client, FRANCE, max_tokens=8))
