"""The grammar that forces a tool call in our tool-call format (Hermes / Qwen, see tool_prompt.py), as an xgrammar
structural tag: `tool_choice` "required" allows one or more calls of any listed function, a named choice exactly
one call of that function; the arguments follow the function's JSON schema. `auto` stays unconstrained (the model
may answer in text) and `none` drops the tools, as in vLLM."""
import json
from typing import Any

CALL_BEGIN = '<tool_call>\n{"name": '
ARGUMENTS = ', "arguments": '
CALL_END = "}\n</tool_call>"


def _call_tag(function: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tag", "begin": CALL_BEGIN + json.dumps(function["name"]) + ARGUMENTS,
            "content": {"type": "json_schema", "json_schema": function.get("parameters") or {"type": "object"},
                        "max_whitespace_cnt": 1},
            "end": CALL_END}


def tool_call_structural_tag(tools: list[dict[str, Any]], choice: str | None,
                             parallel_tool_calls: bool = True) -> dict[str, Any]:
    """The structural tag for `required` (choice None) or for the function named `choice`."""
    functions = [t["function"] for t in tools]
    if choice is not None:
        named = [f for f in functions if f["name"] == choice]
        if not named:
            raise ValueError(f"tool_choice names the function {choice!r}, which is not among the tools")
        return {"type": "structural_tag", "format": _call_tag(named[0])}
    return {"type": "structural_tag",
            "format": {"type": "tags_with_separator", "tags": [_call_tag(f) for f in functions], "separator": "\n",
                       "at_least_one": True, "stop_after_first": not parallel_tool_calls}}
