"""text.chat_template: HF-compatible rendering, in a sandbox."""
from datetime import datetime

import jinja2
import pytest

from text.chat_template import compile_chat_template, render_chat_template

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4."}
USER2 = {"role": "user", "content": "And café × 日本? 😀"}

CONVERSATIONS = {
    "single_user": [USER],
    "with_system": [SYSTEM, USER],
    "multi_turn": [USER, ASSISTANT, USER2],
    "system_multi_turn": [SYSTEM, USER, ASSISTANT, USER2],
    "ends_with_assistant": [SYSTEM, USER, ASSISTANT],
}


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_smollm2_template_renders_like_transformers(smollm_tokenizer, hf_smollm_tokenizer, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_smollm_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert render_chat_template(hf_smollm_tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                bos_token=hf_smollm_tokenizer.bos_token, eos_token=hf_smollm_tokenizer.eos_token) == expected


def test_smollm2_template_adds_default_system_prompt_and_generation_prompt(smollm_tokenizer):
    text = smollm_tokenizer.apply_chat_template([USER])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert not smollm_tokenizer.apply_chat_template([USER], add_generation_prompt=False).endswith("assistant\n")


def test_raise_exception_surfaces_as_value_error_with_the_template_message():
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('first message must be from the user') }}{% endif %}ok")
    assert render_chat_template(template, [USER]) == "ok"
    with pytest.raises(ValueError, match="first message must be from the user"):
        render_chat_template(template, [ASSISTANT])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set _ = messages.append({'role': 'user'}) %}done",  # the environment is immutable too
])
def test_sandbox_refuses_unsafe_access(template):
    with pytest.raises(ValueError) as caught:
        render_chat_template(template, [USER])
    assert isinstance(caught.value.__cause__, jinja2.exceptions.SecurityError)


def test_tojson_leaves_non_ascii_unescaped_and_supports_indent():
    assert render_chat_template("{{ messages[0]['content'] | tojson }}", [USER2]) == '"And café × 日本? 😀"'
    assert render_chat_template("{{ {'a': [1]} | tojson(indent=2) }}", [USER]) == '{\n  "a": [\n    1\n  ]\n}'
    # HF's filter does not HTML-escape either (jinja's built-in one would turn < into \u003c)
    assert render_chat_template("{{ '<b>' | tojson }}", [USER]) == '"<b>"'


def test_tools_and_extra_kwargs_reach_the_template():
    template = ("{% for tool in tools %}{{ tool['function']['name'] }};{% endfor %}"
                "{% if enable_thinking %}think{% endif %}|{{ bos_token }}|{{ eos_token }}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
             {"type": "function", "function": {"name": "search", "parameters": {}}}]
    text = render_chat_template(template, [USER], tools=tools, enable_thinking=True, bos_token="<s>", eos_token="</s>")
    assert text == "get_weather;search;think|<s>|</s>"
    assert render_chat_template("{{ tools is none }}", [USER]) == "True"


def test_strftime_now_and_loop_controls_are_available():
    assert render_chat_template("{{ strftime_now('%Y') }}", [USER]) == str(datetime.now().year)
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['role'] }}{% endfor %}"
    assert render_chat_template(template, [USER, ASSISTANT]) == "user"


def test_trim_blocks_and_generation_block_match_hf_environment():
    template = "{% for m in messages %}\n  {% generation %}{{ m['content'] }}{% endgeneration %}\n{% endfor %}"
    assert render_chat_template(template, [USER, ASSISTANT]) == "What is 2+2?4."


@pytest.mark.parametrize("messages, field", [
    ("hello", "messages"),
    ([USER, "text"], r"messages\[1\]"),
    ([{"content": "no role"}], r"messages\[0\].role"),
    ([{"role": 3, "content": "x"}], r"messages\[0\].role"),
])
def test_malformed_messages_are_rejected_naming_the_field(messages, field):
    with pytest.raises(ValueError, match=field):
        render_chat_template("{{ messages }}", messages)


def test_template_syntax_error_is_a_value_error():
    with pytest.raises(ValueError, match="does not parse"):
        render_chat_template("{% for m in messages %}", [USER])


def test_compiled_templates_are_cached():
    template = "{{ messages | length }} cached"
    assert compile_chat_template(template) is compile_chat_template(template)
