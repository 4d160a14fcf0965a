"""Tools in the prompt for chat templates that do not handle them (the default SmolLM2 template has none).

The Hermes / Qwen convention: the function signatures go into the system message inside <tools></tools>, and
the model is asked to answer with <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Assistant tool calls
and tool results already in the history are rewritten into that same text form, so any template can render them.
"""
import json
from typing import Any

_INSTRUCTIONS = (
    "# Tools\n\n"
    "You can call the functions described below, one JSON signature per line, inside <tools></tools>:\n"
    "<tools>\n{signatures}\n</tools>\n\n"
    "To call one, answer with its name and a JSON object of arguments inside <tool_call></tool_call>, "
    "one block per call:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n</tool_call>\n'
    "Results come back inside <tool_response></tool_response>."
)


def template_handles_tools(template: str) -> bool:
    """Whether a chat template renders `tools` itself (it then also knows its own tool-call format)."""
    return "tools" in template


def tool_call_text(name: str, arguments: Any) -> str:
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def with_tools_in_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation rewritten for a template without tool support: tools described in the system message,
    assistant tool calls as <tool_call> text, consecutive tool results as one user turn of <tool_response>s."""
    rewritten: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [tool_call_text(c["function"]["name"], c["function"].get("arguments", {}))
                     for c in message["tool_calls"]]
            text = "\n".join(filter(None, [message.get("content") or "", *calls]))
            rewritten.append({"role": "assistant", "content": text})
        elif role == "tool":
            response = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
            if rewritten and rewritten[-1].get("_tool_results"):
                rewritten[-1]["content"] += "\n" + response
            else:
                rewritten.append({"role": "user", "content": response, "_tool_results": True})
        else:
            rewritten.append(dict(message))
    for message in rewritten:
        message.pop("_tool_results", None)
    if tools:
        signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        block = _INSTRUCTIONS.format(signatures=signatures)
        if rewritten and rewritten[0].get("role") == "system":
            first = rewritten[0]
            rewritten[0] = {**first, "content": f"{_text(first.get('content'))}\n\n{block}".lstrip()}
        else:
            rewritten.insert(0, {"role": "system", "content": block})
    return rewritten


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI's list of text parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)
