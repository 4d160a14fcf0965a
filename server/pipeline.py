"""The one request pipeline every generating route shares: render a conversation (chat template, tools), tokenize,
check the length, compile the output constraint, queue, and hand the engine's outputs back as (prompt index,
output) pairs. Each API module (chat.py, responses.py, messages.py) only translates its request into this and the
outputs into its own response or events."""
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine import RequestOutput, SamplingParams
from server.async_engine import AsyncEngine
from server.constraints import OutputPlan, after_reasoning, check_compiles
from server.errors import APIError, ClientDisconnected, error_response
from server.state import state_of
from text.reasoning import Reasoning, reasoning_for

logger = logging.getLogger(__name__)
T = TypeVar("T")
Outputs = AsyncIterator[tuple[int, RequestOutput]]


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


def render(request: Request, engine: AsyncEngine, messages: list[dict], plan: OutputPlan,
           template_kwargs: dict | None = None, add_generation_prompt: bool = True, prefill: str = "") -> Prompt:
    """The conversation through the model's chat template, with the plan's tools, then `prefill` (the start of the
    answer, which the model continues); sets plan.reasoning from the server's --reasoning-parser and that prompt."""
    tok = engine.engine.tokenizer
    text = tok.apply_chat_template(messages, tools=plan.tools, add_generation_prompt=add_generation_prompt,
                                   **(template_kwargs or {})) + prefill
    plan.reasoning = reasoning_for(state_of(request).settings.reasoning_parser, tok.chat_template, text)
    plan.constraint = after_reasoning(plan.constraint, plan.reasoning)  # the reasoning itself stays free
    return Prompt(text, tok.encode(text, add_special_tokens=False))


def max_tokens(engine: AsyncEngine, prompt_len: int, requested: int | None, param: str = "max_tokens",
               prompt_param: str = "messages") -> int:
    """The completion's budget: `requested`, or what the context leaves; 400 when the prompt does not fit."""
    limit = engine.engine.max_model_len
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if requested is None:
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                                f"{prompt_len} tokens.", param=prompt_param, code="context_length_exceeded")
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                            f"completion). Please reduce the prompt or {param}.", param=param,
                       code="context_length_exceeded")
    return requested


async def generate(request: Request, engine: AsyncEngine, request_id: str,
                   prompts: list[tuple[Prompt, SamplingParams]], plan: OutputPlan) -> Outputs:
    """Queue the prompts and wait for the first output, so that the engine's refusal (or a constraint that does not
    compile) is a 400 before any byte is sent; the rest follows. Closing the iterator aborts the requests."""
    await check_compiles(engine.engine.grammars, plan)
    settings = state_of(request).settings
    if engine.num_waiting >= settings.max_queue:
        raise APIError(429, f"too many requests waiting ({settings.max_queue}); retry later", code="queue_full")
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    lora = getattr(request.state, "lora", None)  # the adapter the request's `model` names (state.check_model)
    outputs = _merge([engine.generate(rid, p.text, p.token_ids, params, lora)
                      for rid, (p, params) in zip(ids, prompts)])
    first = await unless_disconnected(request, _first(outputs))
    return _chain(first, outputs)


async def final_outputs(request: Request, outputs: Outputs) -> dict[int, RequestOutput]:
    """Each prompt's last output (the finished one), unless the client goes away first."""
    async def last() -> dict[int, RequestOutput]:
        return {i: out async for i, out in outputs}
    return await unless_disconnected(request, last())


async def _merge(generators: list[AsyncIterator[RequestOutput]]) -> Outputs:
    """Interleave several requests' outputs as (prompt index, output); closing it aborts what is still running."""
    merged: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                merged.put_nowait((i, out))
        except Exception as e:
            merged.put_nowait((i, e))
        finally:
            merged.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await merged.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # the generators' own cleanup aborts their requests
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first(outputs: Outputs) -> tuple[int, RequestOutput]:
    try:
        return await outputs.__anext__()
    except (ValueError, FileNotFoundError) as e:  # the engine rejected the request
        await outputs.aclose()
        raise APIError(400, str(e), code="invalid_value") from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, unless the client goes away first: then cancel it, which aborts its engine requests.

    Streams notice a disconnect when a write fails; this covers the time before the first byte is sent."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":  # the body is already read: only this is left
        pass


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def sse(events: AsyncIterator[dict | str | tuple[str, dict]],
        error_event: Callable[[str], tuple[str, dict]] | None = None) -> StreamingResponse:
    """Server-sent events. OpenAI's chat and completions: `data: {json}` lines, then `data: [DONE]`. Events given as
    (name, body) pairs (the Responses and Anthropic streams) go with an `event:` line and no marker; a failure after
    the headers are sent is then `error_event(message)`, in that API's own shape."""
    async def body():
        named = error_event is not None
        try:
            async for event in events:
                if isinstance(event, tuple):
                    name, data = event
                    yield f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
                    continue
                data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
                yield f"data: {data}\n\n"
        except Exception as e:  # after the headers are sent, an error can only travel as an event
            logger.warning("stream failed: %s", e)
            if named:
                name, data = error_event(str(e))
                yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
            else:
                yield f"data: {json.dumps(json.loads(error_response(500, str(e)).body))}\n\n"
        if not named:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["Prompt", "Reasoning", "render", "max_tokens", "generate", "final_outputs", "sse"]
