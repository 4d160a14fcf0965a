"""OpenAI's Responses API: POST /v1/responses (plain or streamed), GET and DELETE /v1/responses/{id}.

A request's input items become chat messages (responses_protocol.py) and go through the shared pipeline. The answer
is cut into output items by one builder, `_Items`: reasoning (when the model reasons), a message with the text, a
function_call per tool call. The streamed events come from the same builder fed delta by delta, so they add up to
the non-streamed response. Stored responses (`store`, the default) keep their conversation for
`previous_response_id`, in memory, the oldest evicted first beyond --max-stored-responses."""
import copy
import time
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Depends, Request

from engine import RequestOutput, SamplingParams
from server.async_engine import AsyncEngine
from server.constraints import plan_tools
from server.errors import APIError
from server.pipeline import final_outputs, generate, max_tokens, render, sse
from server.responses_protocol import ResponsesRequest, item_dict, to_messages
from server.state import ERRORS, authorized, check_model, ready, state_of
from text.reasoning import Reasoning, StreamingReasoning
from text.tool_parser import StreamingToolParser

router = APIRouter(dependencies=[Depends(authorized)], responses=ERRORS)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Items:
    """Text deltas -> output items and the stream events that build them (without sequence numbers)."""

    def __init__(self, reasoning: Reasoning | None, parse_tools: bool):
        self.thinking = StreamingReasoning(reasoning)
        self.tools = StreamingToolParser() if parse_tools else None
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item whose deltas are being sent
        self.reasoning_text = ""

    def feed(self, delta: str, final: bool) -> list[dict[str, Any]]:
        thought, answer = self.thinking.feed(delta, final)
        events = self._reason(thought) if thought else []
        if self.tools is None:
            events += self._text(answer)
        else:
            for piece in self.tools.feed(answer) + (self.tools.finish() if final else []):
                if piece.tool_index is None:
                    events += self._text(piece.content)
                else:
                    events += self._call(piece.id, piece.name, piece.arguments)
        if final:
            events += self._close()
        return copy.deepcopy(events)  # the items go on growing after their events are made

    def _start(self, item: dict[str, Any], kind: str) -> list[dict[str, Any]]:
        events = self._close()
        self.open = {"kind": kind, "item": item, "index": len(self.items)}
        self.items.append(item)
        return events + [{"type": "response.output_item.added", "output_index": self.open["index"],
                          "item": {**item, "status": "in_progress"}}]

    def _reason(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self.open is None or self.open["kind"] != "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "completed"}
            events += self._start(item, "reasoning")
            events.append(self._part("added", {"type": "reasoning_text", "text": ""}))
            item["content"].append({"type": "reasoning_text", "text": ""})
        self.open["item"]["content"][0]["text"] += delta
        self.reasoning_text += delta
        return events + [{"type": "response.reasoning_text.delta", **self._where(), "content_index": 0,
                          "delta": delta}]

    def _text(self, delta: str) -> list[dict[str, Any]]:
        if not delta:
            return []
        events = []
        if self.open is None or self.open["kind"] != "message":
            item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "completed", "content": []}
            events += self._start(item, "message")
            events.append(self._part("added", {"type": "output_text", "text": "", "annotations": [],
                                               "logprobs": []}))
            item["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self.open["item"]["content"][0]["text"] += delta
        return events + [{"type": "response.output_text.delta", **self._where(), "content_index": 0,
                          "delta": delta, "logprobs": []}]

    def _call(self, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
        item = {"id": _id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": "",
                "status": "completed"}
        events = self._start(item, "function_call")
        item["arguments"] = arguments
        events.append({"type": "response.function_call_arguments.delta", **self._where(), "delta": arguments})
        return events + self._close()

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open["item"]["id"], "output_index": self.open["index"]}

    def _part(self, stage: str, part: dict[str, Any]) -> dict[str, Any]:
        return {"type": f"response.content_part.{stage}", **self._where(), "content_index": 0, "part": part}

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        kind, item, events = self.open["kind"], self.open["item"], []
        if kind == "reasoning":
            text = item["content"][0]["text"]
            events.append({"type": "response.reasoning_text.done", **self._where(), "content_index": 0, "text": text})
            events.append(self._part("done", {"type": "reasoning_text", "text": text}))
        elif kind == "message":
            text = item["content"][0]["text"]
            events.append({"type": "response.output_text.done", **self._where(), "content_index": 0, "text": text,
                           "logprobs": []})
            events.append(self._part("done", item["content"][0]))
        else:
            events.append({"type": "response.function_call_arguments.done", **self._where(),
                           "name": item["name"], "arguments": item["arguments"]})
        events.append({"type": "response.output_item.done", "output_index": self.open["index"], "item": item})
        self.open = None
        return events


class _Store:
    """Stored responses: id -> (response body, the conversation's items up to and including its output)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, body: dict, conversation: list[dict]) -> None:
        self.entries[body["id"]] = (body, conversation)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        if response_id not in self.entries:
            raise APIError(404, f"No response found with id {response_id!r}.", param=param, code="not_found")
        return self.entries[response_id]


def _store(request: Request) -> _Store:
    state = state_of(request)
    if state.responses is None:
        state.responses = _Store(state.settings.max_stored_responses)
    return state.responses


@router.post("/v1/responses")
async def create_response(req: ResponsesRequest, request: Request, engine: AsyncEngine = Depends(ready)):
    check_model(request, req.model)
    items = [item_dict(item) for item in req.input_items()]
    history: list[dict] = []
    if req.previous_response_id is not None:
        _, history = _store(request).get(req.previous_response_id, "previous_response_id")
    conversation = history + items
    tools = [tool.as_chat_tool() for tool in req.function_tools()]
    plan = plan_tools(tools, req.choice(), req.parallel_tool_calls, req.constraint(), "text.format",
                      field="parameters", choice_param="tool_choice.name")
    messages = to_messages(req.instructions, ResponsesRequest(input=conversation).input_items())
    prompt = render(request, engine, messages, plan)
    budget = max_tokens(engine, len(prompt.token_ids), req.max_output_tokens, "max_output_tokens", "input")
    params = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                            stop=req.stop, max_tokens=budget, structured_outputs=plan.constraint)
    response_id = _id("resp")
    outputs = await generate(request, engine, response_id, [(prompt, params)], plan)
    tokenizer, model = engine.engine.tokenizer, state_of(request).settings.served_model_name
    body = _body(req, response_id, model)

    def finish(out: RequestOutput, built: _Items) -> dict:
        o = out.outputs[0]
        done = {**body, "output": built.items, "usage": _usage(out, tokenizer, built.reasoning_text),
                "status": "incomplete" if o.finish_reason == "length" else "completed"}
        if o.finish_reason == "length":
            done["incomplete_details"] = {"reason": "max_output_tokens"}
        if req.store:
            _store(request).put(done, conversation + [_as_input(item) for item in built.items])
        return done

    if not req.stream:
        out = (await final_outputs(request, outputs))[0]
        built = _Items(plan.reasoning, plan.parse_tool_calls)
        built.feed(out.outputs[0].text, final=True)
        return finish(out, built)

    async def events():
        sequence = iter(range(10**9))
        start = {**body, "status": "in_progress", "output": []}
        yield "response.created", {"type": "response.created", "sequence_number": next(sequence), "response": start}
        yield "response.in_progress", {"type": "response.in_progress", "sequence_number": next(sequence),
                                       "response": start}
        built, sent, last = _Items(plan.reasoning, plan.parse_tool_calls), 0, None
        async for _, out in outputs:
            last, o = out, out.outputs[0]
            for event in built.feed(o.text[sent:], final=o.finish_reason is not None):
                yield event["type"], {**event, "sequence_number": next(sequence)}
            sent = len(o.text)
        done = finish(last, built)
        kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
        yield kind, {"type": kind, "sequence_number": next(sequence), "response": done}

    return sse(events(), _stream_error)


def _stream_error(message: str) -> tuple[str, dict]:
    return "error", {"type": "error", "code": "server_error", "message": message, "param": None}


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    return _store(request).get(response_id)[0]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    store = _store(request)
    store.get(response_id)
    del store.entries[response_id]
    return {"id": response_id, "object": "response", "deleted": True}


def _body(req: ResponsesRequest, response_id: str, model: str) -> dict:
    fmt = req.text.format if req.text and req.text.format else None
    choice = req.tool_choice
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "completed",
            "error": None, "incomplete_details": None, "instructions": req.instructions, "model": model,
            "output": [], "parallel_tool_calls": req.parallel_tool_calls,
            "tool_choice": choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto"),
            "tools": req.tools or [], "temperature": req.temperature, "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens, "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump() if req.reasoning else None, "store": req.store,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "metadata": req.metadata or {}, "user": req.user, "usage": None}


def _usage(out: RequestOutput, tokenizer, reasoning: str) -> dict:
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    thought = len(tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": min(thought, completion)},
            "total_tokens": prompt + completion}


def _as_input(item: dict) -> dict:
    """An output item as the input item that repeats it in a later turn."""
    if item["type"] == "message":
        return {"type": "message", "role": "assistant", "content": item["content"][0]["text"]}
    if item["type"] == "function_call":
        return {k: item[k] for k in ("type", "call_id", "name", "arguments")}
    return {"type": "reasoning"}
