"""What a request asks of its output's shape: tools (which go into the prompt, and whose calls are parsed out of
the answer), a forced tool call, `response_format`, or vLLM's `structured_outputs`. All of it is checked here,
before the request reaches the engine, so that bad input is a 400 naming the field."""
import asyncio
import json
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import StructuredOutputsParams
from engine.structured_output import Grammars, check_enforceable, check_json_schema
from text.tool_grammar import tool_call_structural_tag
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat, StructuredOutputsRequest
from text.reasoning import Reasoning


@dataclass
class OutputPlan:
    tools: list[dict[str, Any]] | None = None  # for the chat template
    parse_tool_calls: bool = False
    constraint: StructuredOutputsParams | None = None
    param: str | None = None  # the request field the constraint comes from
    reasoning: Reasoning | None = None  # set when the prompt is rendered (server/pipeline.py)


@dataclass(frozen=True)
class Named:
    """A tool_choice naming one function (kept apart from the modes, which a function may share a name with)."""
    name: str


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def plan_chat(req: ChatCompletionRequest) -> OutputPlan:
    for i, message in enumerate(req.messages):
        if message.role == "tool" and message.tool_call_id is None:
            raise _bad("a message with role 'tool' needs the tool_call_id it answers", f"messages[{i}].tool_call_id")
        if message.tool_calls and message.role != "assistant":
            raise _bad("only assistant messages can hold tool_calls", f"messages[{i}].tool_calls")
    constraint, param = format_constraint(req.response_format, req.structured_outputs)
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = Named(choice.function.name)
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
    return plan_tools(tools, choice, req.parallel_tool_calls, constraint, param)


def plan_tools(tools: list[dict[str, Any]], choice: "str | Named | None", parallel: bool,
               constraint: StructuredOutputsParams | None, param: str | None,
               field: str = "function.parameters", choice_param: str = "tool_choice.function.name") -> OutputPlan:
    """The plan for OpenAI-shaped function tools ({"type": "function", "function": {name, parameters}}) and a
    choice: None or "auto" (the model may call), "none" (tools hidden), "required" (at least one call), or
    Named(function) (exactly that call). `field` and `choice_param` name the request's own fields in errors."""
    if not tools:
        if choice not in (None, "none"):
            raise _bad("tool_choice is only allowed when tools are given", "tool_choice")
        return OutputPlan(constraint=constraint, param=param)
    names = [tool["function"]["name"] for tool in tools]
    prefix = field.rpartition(".")[0]
    for i, tool in enumerate(tools):
        if names.index(names[i]) != i:
            raise _bad(f"two tools are named {names[i]!r}", f"tools[{i}].{prefix + '.' if prefix else ''}name")
        if tool["function"].get("parameters") is not None:
            try:
                check_json_schema(tool["function"]["parameters"])
            except ValueError as e:
                raise _bad(f"tools[{i}]: {e}", f"tools[{i}].{field}") from None
    choice = choice or "auto"
    if choice == "none":  # the model is not to call tools: it is not shown them either
        return OutputPlan(constraint=constraint, param=param)
    if choice == "auto":
        return OutputPlan(tools, True, constraint, param)
    named = choice.name if isinstance(choice, Named) else None
    if named is not None and named not in names:
        raise _bad(f"tool_choice names the function {named!r}, which is not among the tools "
                   f"({', '.join(names)})", choice_param)
    for i, tool in enumerate(tools):
        if named in (None, names[i]):
            try:
                check_enforceable(tool["function"].get("parameters") or {})
            except ValueError as e:
                raise _bad(f"tools[{i}]: {e}", f"tools[{i}].{field}") from None
    if constraint is not None:
        raise _bad("a forced tool call (tool_choice required or named) cannot be combined with a constrained "
                   "output format", "tool_choice")
    tag = tool_call_structural_tag(tools, named, parallel)
    return OutputPlan(tools, True, StructuredOutputsParams(structural_tag=tag), "tool_choice")


def plan_completion(req: CompletionRequest) -> OutputPlan:
    return OutputPlan(None, False, *format_constraint(req.response_format, req.structured_outputs))


def format_constraint(response_format: ResponseFormat | None, structured: StructuredOutputsRequest | None
                       ) -> tuple[StructuredOutputsParams | None, str | None]:
    constraint, param = None, None
    if response_format is not None and response_format.type == "json_object":
        constraint, param = StructuredOutputsParams(json_object=True), "response_format"
    elif response_format is not None and response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.schema_ is None:
            raise _bad("response_format of type json_schema needs json_schema.schema", "response_format.json_schema")
        constraint, param = StructuredOutputsParams(json=spec.schema_), "response_format.json_schema.schema"
    if structured is not None:
        if constraint is not None:
            raise _bad("give either response_format or structured_outputs, not both", "structured_outputs")
        fields = structured.model_dump(by_alias=True, exclude_defaults=True)
        try:
            constraint = StructuredOutputsParams(**fields)
        except ValueError as e:
            raise _bad(str(e), "structured_outputs") from None
        param = "structured_outputs"
    return constraint, param


async def check_compiles(grammars: Grammars, plan: OutputPlan) -> None:
    """Compile the plan's constraint now (in a thread: a large schema takes milliseconds), so that an unsupported
    one is a 400 here; the engine later finds it in the compiler's cache."""
    if plan.constraint is None:
        return
    try:
        await asyncio.to_thread(grammars.compile, plan.constraint)
    except ValueError as e:
        raise _bad(str(e), plan.param) from None


def after_reasoning(constraint: StructuredOutputsParams | None, reasoning: Reasoning | None
                    ) -> StructuredOutputsParams | None:
    """The constraint applied after the reasoning block: free text inside it (the block itself optional unless
    the prompt opened it), whitespace, then the constrained answer. One xgrammar structural tag does it all."""
    if constraint is None or reasoning is None:
        return constraint
    block = {"type": "tag", "begin": "" if reasoning.starts_inside else reasoning.open,
             "content": {"type": "any_text"}, "end": reasoning.close}
    if not reasoning.starts_inside:
        block = {"type": "optional", "content": block}
    kind, text = constraint.key
    answer = {"json": lambda: {"type": "json_schema", "json_schema": json.loads(text)},
              "json_object": lambda: {"type": "json_schema", "json_schema": {"type": "object"}},
              "regex": lambda: {"type": "regex", "pattern": text},
              "grammar": lambda: {"type": "grammar", "grammar": text},
              "choice": lambda: {"type": "or", "elements": [{"type": "const_string", "value": c}
                                                            for c in json.loads(text)]},
              "structural_tag": lambda: json.loads(text)["format"]}[kind]()
    return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": {
        "type": "sequence", "elements": [block, {"type": "regex", "pattern": r"\s*"}, answer]}})
