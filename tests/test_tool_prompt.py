"""Tools reach the prompt: through the model's template when it handles them, else in the system message in
the Hermes / Qwen convention, with earlier tool calls and results rewritten as text."""
import json

from text.tool_prompt import template_handles_tools, with_tools_in_prompt

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "東京"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25°C, rain"},
]


def test_tools_go_into_a_new_or_the_existing_system_message():
    plain = with_tools_in_prompt([{"role": "user", "content": "Hi"}], [WEATHER])
    assert [m["role"] for m in plain] == ["system", "user"]
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in plain[0]["content"]
    assert "<tool_call>" in plain[0]["content"]
    kept = with_tools_in_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                [WEATHER])
    assert len(kept) == 2 and kept[0]["content"].startswith("Be brief.\n\n# Tools")


def test_history_tool_calls_and_results_become_text():
    out = with_tools_in_prompt(HISTORY, None)
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    calls = out[1]["content"].split("\n</tool_call>")
    assert json.loads(calls[0].removeprefix("<tool_call>\n")) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert '"東京"' in out[1]["content"]
    assert out[2]["content"] == ("<tool_response>\n18°C, sunny\n</tool_response>\n"
                                 "<tool_response>\n25°C, rain\n</tool_response>")
    assert HISTORY[1]["content"] is None and len(HISTORY) == 4  # the caller's list is left alone


def test_default_template_renders_tools_and_history(smollm_tokenizer):
    assert not template_handles_tools(smollm_tokenizer.chat_template)
    text = smollm_tokenizer.apply_chat_template(HISTORY, tools=[WEATHER])
    assert text.count("<|im_start|>system") == 1 and '"name": "get_weather"' in text
    assert "<|im_start|>assistant\n<tool_call>" in text
    assert "<|im_start|>user\n<tool_response>\n18°C, sunny" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_that_handles_tools_gets_them_unchanged(smollm_tokenizer):
    template = ("{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
                "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    text = smollm_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[WEATHER],
                                                chat_template=template)
    assert text == "TOOL get_weather;[user] Hi"
