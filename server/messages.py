"""Anthropic's Messages API: POST /v1/messages (plain or streamed) and POST /v1/messages/count_tokens, for the
`anthropic` SDK and Claude Code.

A request's messages become the OpenAI-style dicts the chat template takes (tool_use blocks as assistant
`tool_calls`, tool_result blocks as `tool` turns), so tools go through the same prompt, grammar and parser as
/v1/chat/completions. The answer is cut into content blocks by one builder, `_Blocks`: thinking (when the model
reasons), text, a tool_use per call. A stream's events come from the same builder fed delta by delta, so they add
up to the non-streamed message. Errors come in Anthropic's shape (server/errors.py picks it by the path)."""
import json
import secrets
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from engine import CompletionOutput, SamplingParams
from engine.sampling_params import StructuredOutputsParams
from server.async_engine import AsyncEngine
from server.constraints import Named, OutputPlan, plan_tools
from server.errors import APIError, check_api_key
from server.messages_protocol import (CountTokensRequest, DocumentBlock, ErrorResponse, ImageBlock, Message,
                                      MessagesRequest, RedactedThinkingBlock, TextBlock, ThinkingBlock, TokenCount,
                                      ToolChoice, ToolDefinition, ToolResultBlock, ToolUseBlock)
from server.pipeline import Outputs, Prompt, final_outputs, generate, max_tokens, render, sse
from server.state import check_model, ready, state_of
from text.reasoning import Reasoning, StreamingReasoning
from text.tool_parser import Delta, StreamingToolParser


def authorized(request: Request) -> None:
    """Anthropic's clients send the key as `x-api-key`; Claude Code with ANTHROPIC_AUTH_TOKEN sends it as a bearer
    token. Either will do."""
    api_key = state_of(request).settings.api_key
    given = request.headers.get("x-api-key")
    if api_key is not None and given is not None and secrets.compare_digest(given.encode(), api_key.encode()):
        return
    check_api_key(request, api_key)


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
router = APIRouter(dependencies=[Depends(authorized)], responses=ERRORS)


@router.post("/v1/messages", response_model=Message)
async def create_message(req: MessagesRequest, request: Request, engine: AsyncEngine = Depends(ready)):
    check_model(request, req.model)
    plan, prompt = _prompt(request, engine, req)
    # Claude Code asks for tens of thousands of tokens whatever the context holds: the budget is then what the
    # context leaves, and running into it is `model_context_window_exceeded` (Anthropic's stop reason for it)
    clamped = len(prompt.token_ids) + req.max_tokens > engine.engine.max_model_len
    budget = max_tokens(engine, len(prompt.token_ids), None if clamped else req.max_tokens)
    params = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                            stop=req.stop_sequences, max_tokens=budget, structured_outputs=plan.constraint)
    message_id = f"msg_{uuid.uuid4().hex}"
    outputs = await generate(request, engine, message_id, [(prompt, params)], plan)
    reply = _Reply(message_id, state_of(request).settings.served_model_name, plan, len(prompt.token_ids), clamped)
    if req.stream:
        return sse(reply.events(outputs), _stream_error)
    return reply.message((await final_outputs(request, outputs))[0].outputs[0])


def _stream_error(message: str) -> tuple[str, dict]:
    return "error", {"type": "error", "error": {"type": "api_error", "message": message}}


@router.post("/v1/messages/count_tokens", response_model=TokenCount)
async def count_tokens(req: CountTokensRequest, request: Request, engine: AsyncEngine = Depends(ready)):
    """The prompt's length in tokens: the `usage.input_tokens` that /v1/messages reports for the same body."""
    check_model(request, req.model)
    _, prompt = _prompt(request, engine, req)
    return TokenCount(input_tokens=len(prompt.token_ids))


def _prompt(request: Request, engine: AsyncEngine, req: CountTokensRequest) -> tuple[OutputPlan, Prompt]:
    """The output plan (tools in the prompt, a forced call's grammar) and the prompt, rendered by the chat
    template; a final assistant turn is left open for the model to continue (Anthropic's prefill)."""
    messages, prefill = to_template(req)
    tools = [_function(tool) for tool in req.tools or []]
    choice = req.tool_choice
    answer = req.output_config.format if req.output_config else None
    constraint = None if answer is None else StructuredOutputsParams(json=answer.schema_)
    plan = plan_tools(tools, _tool_choice(choice), not (choice and choice.disable_parallel_tool_use), constraint,
                      None if answer is None else "output_config.format.schema", field="input_schema",
                      choice_param="tool_choice.name")
    # Qwen3's template reads enable_thinking; it is passed only when the request says
    kwargs = None if req.thinking is None else {"enable_thinking": req.thinking.type != "disabled"}
    return plan, render(request, engine, messages, plan, kwargs, prefill=prefill)


def _function(tool: ToolDefinition) -> dict[str, Any]:
    """An Anthropic tool as the OpenAI function tool the chat template and plan_tools take."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function | {"parameters": tool.input_schema}}


def _tool_choice(choice: ToolChoice | None) -> str | Named | None:
    """Anthropic's tool_choice as plan_tools takes it: None (auto), "none", "required" or Named(tool)."""
    if choice is None or choice.type == "auto":
        return None
    if choice.type == "tool":
        if not choice.name:
            raise _bad("tool_choice.name is required when tool_choice.type is 'tool'", "tool_choice.name")
        return Named(choice.name)
    return "required" if choice.type == "any" else "none"


# ---- the conversation ----

def to_template(req: CountTokensRequest) -> tuple[list[dict[str, Any]], str]:
    """The conversation as chat-template messages (the shape of server/protocol.py's ChatMessage.for_template),
    and the text of a final assistant turn for the model to continue ("" when there is none). The system prompt
    is `system` followed by the text of any system-role messages."""
    system = [_text(req.system, "system")] if req.system else []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        where = f"messages[{i}]"
        if message.role == "system":
            system.append(_text(message.content, f"{where}.content"))
        elif message.role == "user":
            messages += _user_turns(message.content, where)
        else:
            messages.append(_assistant_turn(message.content, where))
    prefill = ""
    if messages and messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
        prefill = messages.pop()["content"]
    if any(system):
        messages.insert(0, {"role": "system", "content": "\n\n".join(s for s in system if s)})
    return messages, prefill


def _text(content: str | list, where: str) -> str:
    """The text of content that may hold only text blocks, separate blocks as paragraphs."""
    if isinstance(content, str):
        return content
    for j, block in enumerate(content):
        if not isinstance(block, TextBlock):
            _refuse(block, f"{where}[{j}]", "text-only content")
    return "\n\n".join(block.text for block in content)


def _user_turns(content: list, where: str) -> list[dict[str, Any]]:
    """A user message's text as user turns, each tool_result block as a `tool` turn, in their order."""
    turns: list[dict[str, Any]] = []
    text: list[str] = []
    for j, block in enumerate(content):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if text:
                turns.append({"role": "user", "content": "\n\n".join(text)})
                text = []
            result = _text(block.content, f"{where}.content[{j}].content")
            # the chat template has no error flag: the model learns of the failure from the text
            turns.append({"role": "tool", "content": f"Error: {result}" if block.is_error else result,
                          "tool_call_id": block.tool_use_id})
        else:
            _refuse(block, f"{where}.content[{j}]", "a user turn")
    if text or not turns:
        turns.append({"role": "user", "content": "\n\n".join(text)})
    return turns


def _assistant_turn(content: list, where: str) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif not isinstance(block, (ThinkingBlock, RedactedThinkingBlock)):  # earlier reasoning stays out
            _refuse(block, f"{where}.content[{j}]", "an assistant turn")
    turn: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(text)}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _refuse(block, where: str, place: str) -> None:
    if isinstance(block, (ImageBlock, DocumentBlock)):
        raise _bad(f"{where}: {block.type} blocks are not supported; this model reads text only", where)
    raise _bad(f"{where}: {block.type} blocks cannot be in {place}", where)


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


# ---- the answer ----

def _tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


class _Blocks:
    """Answer text -> content blocks, and the stream events that build them (each event's `type` is its name)."""

    def __init__(self, reasoning: Reasoning | None, parse_tools: bool):
        self.thinking = StreamingReasoning(reasoning)
        self.tools = StreamingToolParser(_tool_use_id) if parse_tools else None
        self.blocks: list[dict[str, Any]] = []
        self.open = False  # whether the last block still takes deltas
        self.called = False

    def feed(self, delta: str, final: bool) -> list[dict[str, Any]]:
        thought, answer = self.thinking.feed(delta, final)
        events = self._delta("thinking", thought)
        if self.tools is None:
            pieces = [Delta(content=answer)]
        else:
            pieces = self.tools.feed(answer) + (self.tools.finish() if final else [])
        for piece in pieces:
            events += self._delta("text", piece.content) if piece.tool_index is None else self._tool_use(piece)
        return events + (self._close() if final else [])

    def _delta(self, kind: str, delta: str | None) -> list[dict[str, Any]]:
        starts = not (self.open and self.blocks[-1]["type"] == kind)
        if starts and self.blocks and self.blocks[-1]["type"] == "tool_use":
            delta = (delta or "").lstrip()  # the whitespace between a call and the text after it
        if not delta:
            return []
        events = []
        if starts:
            events = self._start({"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})})
        self.blocks[-1][kind] += delta
        return events + [{"type": "content_block_delta", "index": len(self.blocks) - 1,
                          "delta": {"type": f"{kind}_delta", kind: delta}}]

    def _tool_use(self, call: Delta) -> list[dict[str, Any]]:
        self.called = True
        events = self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
        self.blocks[-1]["input"] = json.loads(call.arguments)  # the parser's arguments are a JSON object
        events.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                       "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
        return events + self._close()

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.blocks.append(block)
        self.open = True
        return events + [{"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": dict(block)}]

    def _close(self) -> list[dict[str, Any]]:
        if not self.open:
            return []
        self.open = False
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]


class _Reply:
    """The engine's output as a message, or as the events that stream it."""

    def __init__(self, message_id: str, model: str, plan: OutputPlan, input_tokens: int, clamped: bool):
        self.message_id, self.model, self.plan = message_id, model, plan
        self.input_tokens, self.clamped = input_tokens, clamped

    def _blocks(self) -> _Blocks:
        return _Blocks(self.plan.reasoning, self.plan.parse_tool_calls)

    def _body(self, content: list, stop: tuple[str | None, str | None], output_tokens: int) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1],
                "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens}}

    def _stop(self, o: CompletionOutput, called: bool) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence)."""
        if o.finish_reason == "length":
            return "model_context_window_exceeded" if self.clamped else "max_tokens", None
        if called:
            return "tool_use", None
        if isinstance(o.stop_reason, str):  # a stop string matched (a token id is the end of the turn)
            return "stop_sequence", o.stop_reason
        return "end_turn", None

    def message(self, o: CompletionOutput) -> dict[str, Any]:
        blocks = self._blocks()
        blocks.feed(o.text, final=True)
        return self._body(blocks.blocks, self._stop(o, blocks.called), len(o.token_ids))

    async def events(self, outputs: Outputs):
        yield "message_start", {"type": "message_start", "message": self._body([], (None, None), 0)}
        yield "ping", {"type": "ping"}
        blocks, sent, last = self._blocks(), 0, None
        async for _, out in outputs:
            last = out.outputs[0]
            delta, sent = last.text[sent:], len(last.text)
            if delta or last.finished:
                for event in blocks.feed(delta, last.finished):
                    yield event["type"], event
        stop_reason, stop_sequence = self._stop(last, blocks.called)
        yield "message_delta", {"type": "message_delta",
                                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                "usage": {"output_tokens": len(last.token_ids)}}
        yield "message_stop", {"type": "message_stop"}
