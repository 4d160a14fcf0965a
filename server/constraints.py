"""What a request asks of its output's shape: tools (which go into the prompt, and whose calls are parsed out of
the answer), a forced tool call, `response_format`, or vLLM's `structured_outputs`. All of it is checked here,
before the request reaches the engine, so that bad input is a 400 naming the field."""
import asyncio
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import StructuredOutputsParams
from engine.structured_output import Grammars, check_enforceable, check_json_schema
from models.tool_grammar import tool_call_structural_tag
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat, StructuredOutputsRequest


@dataclass
class OutputPlan:
    tools: list[dict[str, Any]] | None = None  # for the chat template
    parse_tool_calls: bool = False
    constraint: StructuredOutputsParams | None = None
    param: str | None = None  # the request field the constraint comes from


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def plan_chat(req: ChatCompletionRequest) -> OutputPlan:
    for i, message in enumerate(req.messages):
        if message.role == "tool" and message.tool_call_id is None:
            raise _bad("a message with role 'tool' needs the tool_call_id it answers", f"messages[{i}].tool_call_id")
        if message.tool_calls and message.role != "assistant":
            raise _bad("only assistant messages can hold tool_calls", f"messages[{i}].tool_calls")
    constraint, param = _format_constraint(req.response_format, req.structured_outputs)
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise _bad("tool_choice is only allowed when tools are given", "tool_choice")
        return OutputPlan(constraint=constraint, param=param)
    names = [tool.function.name for tool in req.tools]
    for i, tool in enumerate(req.tools):
        if names.index(tool.function.name) != i:
            raise _bad(f"two tools are named {tool.function.name!r}", f"tools[{i}].function.name")
        if tool.function.parameters is not None:
            try:
                check_json_schema(tool.function.parameters)
            except ValueError as e:
                raise _bad(f"tools[{i}]: {e}", f"tools[{i}].function.parameters") from None
    choice = choice or "auto"
    if choice == "none":  # the model is not to call tools: it is not shown them either
        return OutputPlan(constraint=constraint, param=param)
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools]
    if choice == "auto":
        return OutputPlan(tools, True, constraint, param)
    named = None if choice == "required" else choice.function.name
    if named is not None and named not in names:
        raise _bad(f"tool_choice names the function {named!r}, which is not among the tools "
                   f"({', '.join(names)})", "tool_choice.function.name")
    for i, tool in enumerate(req.tools):
        if named in (None, tool.function.name):
            try:
                check_enforceable(tool.function.parameters or {})
            except ValueError as e:
                raise _bad(f"tools[{i}]: {e}", f"tools[{i}].function.parameters") from None
    if constraint is not None:
        raise _bad("a forced tool call (tool_choice required or named) cannot be combined with a constrained "
                   "response_format or structured_outputs", "tool_choice")
    tag = tool_call_structural_tag(tools, named, req.parallel_tool_calls)
    return OutputPlan(tools, True, StructuredOutputsParams(structural_tag=tag), "tool_choice")


def plan_completion(req: CompletionRequest) -> OutputPlan:
    return OutputPlan(None, False, *_format_constraint(req.response_format, req.structured_outputs))


def _format_constraint(response_format: ResponseFormat | None, structured: StructuredOutputsRequest | None
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
