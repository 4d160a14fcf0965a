"""OpenAI's Responses API through the official openai SDK against the real server: plain and streamed (the events
build exactly the non-streamed response), a forced function call, text.format json_schema, a second turn through
previous_response_id, a developer message, stored responses, and bad input."""
import json

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2"
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 40},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def _strip_ids(value):
    """A response without what differs between two requests: ids, timestamps."""
    if isinstance(value, dict):
        return {k: _strip_ids(v) for k, v in value.items() if k not in ("id", "created_at", "call_id", "parsed")}  # parsed: the SDK adds it
    if isinstance(value, list):
        return [_strip_ids(v) for v in value]
    return value


def test_plain_and_streamed_responses_are_the_same(openai_client):
    ask = dict(model=MODEL, input="Say hello.", max_output_tokens=64, temperature=0)
    plain = openai_client.responses.create(**ask)
    assert plain.status == "completed" and plain.output_text  # a short answer: the SDK's stream helper wants it
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
    types = []
    with openai_client.responses.stream(**ask) as stream:
        for event in stream:
            types.append(event.type)
        streamed = stream.get_final_response()
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    for expected in ("response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done"):
        assert expected in types
    deltas = []
    with httpx.stream("POST", f"{openai_client.base_url}responses", headers={"Authorization": f"Bearer "
                      f"{openai_client.api_key}"}, json={**ask, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "response.output_text.delta":
                    deltas.append(event["delta"])
                last = event
    assert "".join(deltas) == plain.output_text == streamed.output_text
    assert _strip_ids(last["response"]["output"]) == _strip_ids(plain.model_dump(exclude_none=True)["output"])
    assert _strip_ids(streamed.model_dump()["output"]) == _strip_ids(plain.model_dump()["output"])


def test_forced_function_call_validates_and_streams_its_arguments(openai_client):
    ask = dict(model=MODEL, input="What is the weather like in Paris?", tools=[WEATHER],
               tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, temperature=0)
    response = openai_client.responses.create(**ask)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    with openai_client.responses.stream(**ask) as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == calls[0].arguments
    assert [i.type for i in streamed.output] == [i.type for i in response.output]
    # hosted tools a client sends (Codex does) are ignored, not refused
    mixed = openai_client.responses.create(**{**ask, "tools": [{"type": "web_search"}, WEATHER]})
    assert [i.name for i in mixed.output if i.type == "function_call"] == ["get_weather"]


def test_text_format_json_schema_is_valid(openai_client):
    response = openai_client.responses.create(
        model=MODEL, input="Invent a person.", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), PERSON)


def test_previous_response_id_continues_the_conversation_and_developer_messages_reach_the_prompt(server,
                                                                                                 openai_client):
    first = openai_client.responses.create(
        model=MODEL, max_output_tokens=8, temperature=0,
        input=[{"role": "developer", "content": "Answer in one word."},
               {"role": "user", "content": [{"type": "input_text", "text": "My name is Zorblat. Hi!"}]}])
    assert openai_client.responses.retrieve(first.id).output_text == first.output_text
    second = openai_client.responses.create(model=MODEL, previous_response_id=first.id, input="What is my name?",
                                            max_output_tokens=8, temperature=0)
    # the second prompt holds the first turn: the developer text, the name, the first answer, the new question
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    alone = openai_client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=8, temperature=0)
    assert second.usage.input_tokens > alone.usage.input_tokens + 10
    openai_client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.create(model=MODEL, previous_response_id=first.id, input="Hi", max_output_tokens=4)
    unstored = openai_client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(unstored.id)


def test_function_call_output_round_trip(openai_client):
    answer = openai_client.responses.create(
        model=MODEL, max_output_tokens=16, temperature=0, tools=[WEATHER],
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                "arguments": json.dumps({"city": "Paris", "unit": "celsius"})},
               {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees and sunny"}])
    assert answer.status in ("completed", "incomplete") and answer.output


BAD = [
    ("input-missing", {"model": MODEL}, 400, "input"),
    ("input-empty", {"model": MODEL, "input": []}, 400, "input"),
    ("input-image", {"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "http://x/y.png"}]}]}, 400, "input[0].content[0].type"),
    ("item-type-unknown", {"model": MODEL, "input": [{"type": "computer_call_output", "call_id": "c"}]}, 400,
     "input[0].type"),
    ("role-unknown", {"model": MODEL, "input": [{"role": "wizard", "content": "Hi"}]}, 400, "input[0].role"),
    ("only-instructions", {"model": MODEL, "input": [{"role": "system", "content": "Be nice"}]}, 400, "input"),
    ("max_output_tokens-0", {"model": MODEL, "input": "Hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ("temperature-3", {"model": MODEL, "input": "Hi", "temperature": 3}, 400, "temperature"),
    ("too-long", {"model": MODEL, "input": "Hi", "max_output_tokens": 5000}, 400, "max_output_tokens"),
    ("schema-missing", {"model": MODEL, "input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
     400, "text.format.schema"),
    ("tool-name-bad", {"model": MODEL, "input": "Hi", "tools": [{**WEATHER, "name": "no spaces allowed"}]}, 400,
     "tools[0].name"),
    ("tool-schema-bad", {"model": MODEL, "input": "Hi", "tools": [{**WEATHER, "parameters": {"type": "frob"}}]},
     400, "tools[0].parameters"),
    ("choice-unknown-function", {"model": MODEL, "input": "Hi", "tools": [WEATHER],
                                 "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice.name"),
    ("previous-unknown", {"model": MODEL, "input": "Hi", "previous_response_id": "resp_nope"}, 404,
     "previous_response_id"),
    ("model-unknown", {"model": "gpt-5", "input": "Hi"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_a_4xx_in_openai_shape(server, body, status, param):
    response = httpx.post(f"{server.base_url}/v1/responses", headers=server.headers, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert httpx.get(f"{server.base_url}/v1/responses/resp_missing", headers=server.headers).status_code == 404
    assert httpx.get(f"{server.base_url}/health").status_code == 200
