"""Hermes/Qwen tool-call parsing: one-shot results, and the streaming parser
agreeing with the one-shot parser for every way of chunking the output."""
import itertools
import json
import random
import re

import pytest

from text.tool_parser import Delta, StreamingToolParser, ToolCall, parse_tool_calls


def call(name, args=None, key="arguments"):
    obj = {"name": name} if args is None else {"name": name, key: args}
    return f"<tool_call>{json.dumps(obj, ensure_ascii=False)}</tool_call>"


WEATHER = call("get_weather", {"city": "Paris"})
OUTPUTS = {
    "plain": "Hello there, nothing to call.",
    "empty": "",
    "whitespace": "  \n ",
    "one-call": WEATHER,
    "text-before": "Let me check.\n" + WEATHER,
    "text-after": WEATHER + "\nDone checking.",
    "two-calls": "I'll look both up.\n" + WEATHER + "\n" + call("get_time", {"tz": "CET"}) + "\n",
    "three-back-to-back": call("a", {"x": 1}) + call("b", {"y": [1, 2]}) + call("c", {}),
    "padded-json": "<tool_call>\n  {\"name\": \"f\", \"arguments\": {\"k\": true}}  \n</tool_call>",
    "nested": call("search", {"q": {"and": [{"tag": "x"}, {"tag": ["y", None, 2.5]}]}, "n": [[1], []]}),
    "braces-and-tags-in-strings": call("echo", {"s": "a {b} }{ <tool_call> </tool_call> {\"x\": 1}"}),
    "escapes": call("write", {"path": "C:\\dir\\", "text": "say \"hi\"\\n", "q": "\\\""}),
    "unicode": "Voilà: " + call("weather", {"city": "東京", "note": "café 😀"}) + " ✓",
    "parameters-synonym": call("f", {"a": 1}, key="parameters"),
    "missing-arguments": call("ping"),
    "malformed-json": "Try: <tool_call>{\"name\": \"f\", \"arguments\": {oops}}</tool_call> end",
    "unbalanced-json": "x <tool_call>{\"name\": \"f\"</tool_call> y " + WEATHER,
    "args-not-object": "<tool_call>{\"name\": \"f\", \"arguments\": \"city=Paris\"}</tool_call>",
    "not-an-object": "<tool_call>[1, 2]</tool_call>" + WEATHER,
    "junk-after-json": "<tool_call>{\"name\": \"f\", \"arguments\": {}} junk</tool_call>" + WEATHER,
    "unterminated-valid": "Calling now. <tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": \"}\"}}\n",
    "unterminated-invalid": "Calling now. <tool_call>{\"name\": \"f\", \"argu",
    "unterminated-after-call": WEATHER + "\n<tool_call>{\"name\": \"g\"}",
    "toolbox": "use <toolbox> and <tool_calls> or <tool, not <tool_call",
    "partial-tag-end": "see <tool_ca",
    "stray-close": "a </tool_call> b",
}

EXPECTED = {  # (content, [(name, arguments object)]) for each output
    "plain": ("Hello there, nothing to call.", []),
    "empty": (None, []),
    "whitespace": (None, []),
    "one-call": (None, [("get_weather", {"city": "Paris"})]),
    "text-before": ("Let me check.", [("get_weather", {"city": "Paris"})]),
    "text-after": ("Done checking.", [("get_weather", {"city": "Paris"})]),
    "two-calls": ("I'll look both up.", [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    "three-back-to-back": (None, [("a", {"x": 1}), ("b", {"y": [1, 2]}), ("c", {})]),
    "padded-json": (None, [("f", {"k": True})]),
    "nested": (None, [("search", {"q": {"and": [{"tag": "x"}, {"tag": ["y", None, 2.5]}]}, "n": [[1], []]})]),
    "braces-and-tags-in-strings": (None, [("echo", {"s": "a {b} }{ <tool_call> </tool_call> {\"x\": 1}"})]),
    "escapes": (None, [("write", {"path": "C:\\dir\\", "text": "say \"hi\"\\n", "q": "\\\""})]),
    "unicode": ("Voilà:  ✓", [("weather", {"city": "東京", "note": "café 😀"})]),
    "parameters-synonym": (None, [("f", {"a": 1})]),
    "missing-arguments": (None, [("ping", {})]),
    "malformed-json": ("Try: <tool_call>{\"name\": \"f\", \"arguments\": {oops}}</tool_call> end", []),
    "unbalanced-json": ("x <tool_call>{\"name\": \"f\"</tool_call> y", [("get_weather", {"city": "Paris"})]),
    "args-not-object": (OUTPUTS["args-not-object"], []),
    "not-an-object": ("<tool_call>[1, 2]</tool_call>", [("get_weather", {"city": "Paris"})]),
    "junk-after-json": ("<tool_call>{\"name\": \"f\", \"arguments\": {}} junk</tool_call>",
                        [("get_weather", {"city": "Paris"})]),
    "unterminated-valid": ("Calling now.", [("f", {"a": "}"})]),
    "unterminated-invalid": (OUTPUTS["unterminated-invalid"], []),
    "unterminated-after-call": (None, [("get_weather", {"city": "Paris"}), ("g", {})]),
    "toolbox": (OUTPUTS["toolbox"], []),
    "partial-tag-end": ("see <tool_ca", []),
    "stray-close": ("a </tool_call> b", []),
}


def counter_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter):024x}"


def accumulate(deltas: list[Delta]) -> tuple[str, list[ToolCall]]:
    """Rebuild a message from streamed deltas as an OpenAI client would.
    Content comes back as "" when none was streamed, where the one-shot parser
    says None; `same_as_oneshot` treats the two as equal."""
    content = ""
    calls: list[ToolCall] = []
    for d in deltas:
        assert d.content is not None or d.tool_index is not None, "empty delta"
        if d.content is not None:
            assert d.content, "empty content delta"
            assert d.tool_index is None
            content += d.content
        if d.tool_index is not None:
            if d.tool_index == len(calls):  # first delta of a new call
                assert d.id and d.name is not None
                calls.append(ToolCall(d.id, d.name, d.arguments or ""))
            else:
                assert d.tool_index == len(calls) - 1, "tool indexes must be 0, 1, 2... in order"
                assert d.id is None and d.name is None
                calls[-1].arguments += d.arguments or ""
    return content, calls


def stream(chunks: list[str]) -> tuple[str, list[ToolCall]]:
    parser = StreamingToolParser(id_factory=counter_ids())
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    return accumulate(deltas)


def same_as_oneshot(text: str, chunks: list[str]) -> None:
    assert "".join(chunks) == text
    content, calls = parse_tool_calls(text, id_factory=counter_ids())
    got_content, got_calls = stream(chunks)
    assert got_content == (content or ""), chunks
    assert got_calls == calls, chunks


@pytest.mark.parametrize("name", OUTPUTS)
def test_oneshot_results(name):
    content, calls = parse_tool_calls(OUTPUTS[name])
    want_content, want_calls = EXPECTED[name]
    assert content == want_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == want_calls


@pytest.mark.parametrize("name", OUTPUTS)
def test_stream_every_two_way_split(name):
    text = OUTPUTS[name]
    for i in range(len(text) + 1):
        same_as_oneshot(text, [text[:i], text[i:]])


@pytest.mark.parametrize("name", OUTPUTS)
def test_stream_one_character_at_a_time(name):
    text = OUTPUTS[name]
    same_as_oneshot(text, list(text))
    same_as_oneshot(text, [text])


def test_stream_random_splits():
    rng = random.Random(1234)
    texts = list(OUTPUTS.values())
    for _ in range(400):
        text = rng.choice(texts)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 8))))
        same_as_oneshot(text, [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])


def test_ids_are_openai_style_and_distinct():
    _, calls = parse_tool_calls(OUTPUTS["three-back-to-back"])
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 3


def test_arguments_are_compact_json_keeping_unicode():
    _, [c] = parse_tool_calls(OUTPUTS["unicode"])
    assert c.arguments == '{"city": "東京", "note": "café 😀"}'


def test_stream_emits_content_early_and_call_at_its_closing_tag():
    parser = StreamingToolParser()
    assert parser.feed("  Checking ") == [Delta(content="Checking")]
    assert parser.feed("now <tool_") == [Delta(content=" now")]  # tag prefix held back
    assert parser.feed('call>{"name": "f", "arguments": {"a": 1}}') == []
    [d] = parser.feed("</tool_call>")
    assert (d.tool_index, d.name, d.arguments) == (0, "f", '{"a": 1}')
    assert re.fullmatch(r"call_[0-9a-f]{24}", d.id)
    assert parser.feed("\n") == [] and parser.finish() == []


def test_stream_releases_a_tag_prefix_that_turns_out_to_be_text():
    parser = StreamingToolParser()
    assert parser.feed("use <tool") == [Delta(content="use")]
    assert parser.feed("box>") == [Delta(content=" <toolbox>")]
    parser = StreamingToolParser()
    assert parser.feed("see <tool_ca") == [Delta(content="see")]
    assert parser.finish() == [Delta(content=" <tool_ca")]
