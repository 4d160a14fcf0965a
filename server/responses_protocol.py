"""Request bodies of OpenAI's Responses API (POST /v1/responses), and the translation of its input items into the
chat messages the template renders. Unknown fields are ignored; tool types tokenmill cannot run (web search, file
search, shell: clients such as Codex send them) are dropped with a warning."""
import json
import logging
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from engine.sampling_params import StructuredOutputsParams
from server.constraints import Named
from server.errors import APIError, _param_path
from server.protocol import _NAME, _Request

logger = logging.getLogger(__name__)


class ContentPart(_Request):
    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str | None = None
    refusal: str | None = None

    @property
    def value(self) -> str:
        return self.text if self.text is not None else (self.refusal or "")


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.value for p in self.content)


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.value for p in self.output)


class ReasoningItem(_Request):
    """Reasoning from an earlier turn, which clients send back; not shown to the model again."""
    type: Literal["reasoning"]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
_ITEM_TYPES = {"message": MessageItem, "function_call": FunctionCallItem,
               "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class FunctionChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=_NAME)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(_Request):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # vLLM-style extras, as on chat
    seed: int | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("input must not be empty")
        return value

    def input_items(self) -> list[InputItem]:
        """The input as typed items: a string is one user message; an item without `type` is a message."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        items = []
        for i, raw in enumerate(self.input):
            kind = raw.get("type", "message")
            if kind not in _ITEM_TYPES:
                raise APIError(400, f"input items of type {kind!r} are not supported (text messages, function calls "
                                    "and their outputs are)", param=f"input[{i}].type", code="invalid_value")
            parts = raw.get("content") if isinstance(raw.get("content"), list) else []
            for j, part in enumerate(parts):
                if isinstance(part, dict) and part.get("type") in ("input_image", "input_file", "input_audio"):
                    raise APIError(400, f"{part['type']} content is not supported: the model reads text only",
                                   param=f"input[{i}].content[{j}].type", code="invalid_value")
            items.append(_validated(_ITEM_TYPES[kind], {**raw, "type": kind}, f"input[{i}]"))
        return items

    def function_tools(self) -> list[FunctionTool]:
        tools = []
        for i, raw in enumerate(self.tools or []):
            if raw.get("type") != "function":
                logger.warning("ignoring a tool of type %r: tokenmill runs function tools only", raw.get("type"))
                continue
            tools.append(_validated(FunctionTool, raw, f"tools[{i}]"))
        return tools

    def choice(self) -> str | Named | None:
        """tool_choice as plan_tools takes it; a hosted tool's choice means "auto" (its tool was dropped)."""
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice):
            return Named(choice.name)
        if isinstance(choice, dict):
            logger.warning("ignoring tool_choice of type %r: tokenmill runs function tools only", choice.get("type"))
            return "auto" if self.tools else None
        return choice

    def constraint(self) -> StructuredOutputsParams | None:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.schema_ is None:
            raise APIError(400, "text.format of type json_schema needs a schema", param="text.format.schema",
                           code="invalid_value")
        return StructuredOutputsParams(json=fmt.schema_)


def _validated(model: type[_Request], raw: dict[str, Any], where: str):
    """model(raw), or a 400 naming the field (`where` + its path)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        path = _param_path(first["loc"])
        param = f"{where}.{path}" if path else where
        raise APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None


def to_messages(instructions: str | None, items: list[InputItem]) -> list[dict[str, Any]]:
    """Input items -> chat messages for the template: instructions and leading system/developer messages as one
    system message; function calls as an assistant turn's tool_calls; their outputs as tool messages."""
    messages: list[dict[str, Any]] = []
    system = [instructions] if instructions else []
    for item in items:
        if isinstance(item, MessageItem):
            if item.role in ("system", "developer"):
                if not messages:
                    system.append(item.text())
                else:
                    messages.append({"role": "system", "content": item.text()})
            else:
                messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if not any(m["role"] != "system" for m in messages):
        raise APIError(400, "input holds no user message", param="input", code="invalid_value")
    return messages


def item_dict(item: InputItem) -> dict[str, Any]:
    """An input item as stored for a later previous_response_id."""
    return json.loads(item.model_dump_json(by_alias=True, exclude_none=True))
