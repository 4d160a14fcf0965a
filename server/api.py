"""FastAPI app: OpenAI-style /v1/chat/completions and /v1/completions (with SSE streaming), /v1/embeddings,
/v1/models, /health, /metrics, /version. Routes stay thin: validate, tokenize (after grounding a chat that asks
for rag, server/retrieval.py), hand to the AsyncEngine, format its outputs."""
import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from engine import LLMEngine, RequestOutput
from engine.config import EngineConfig
from server import responses as fmt
from server.async_engine import AsyncEngine
from server.constraints import check_compiles, plan_chat, plan_completion
from server.errors import (APIError, BodySizeLimit, ClientDisconnected, check_api_key, error_response,
                           install_error_handlers, unavailable)
from server.metrics import Metrics
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                             EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelCard, ModelList, random_id)
from server.retrieval import Retrieval, cited_response, cited_stream

logger = logging.getLogger(__name__)

T = TypeVar("T")
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


@dataclass
class ServerSettings:
    engine: EngineConfig
    served_model_name: str = "default"
    api_key: str | None = None
    max_queue: int = 1024  # waiting requests beyond this get 429
    max_body_bytes: int = 4 * 2**20
    embedding_model: str | None = "default"  # behind /v1/embeddings and rag; None: neither
    rag_index: str | None = None


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics
    engine: AsyncEngine | None = None
    retrieval: Retrieval | None = None
    draining: bool = False
    load_error: str | None = None
    on_load_failure: object = None  # callable run (in the loader thread) when the model cannot be loaded
    loaded: threading.Event = field(default_factory=threading.Event)

    def load(self) -> None:
        try:
            self.retrieval = self._load_retrieval()  # first: a bad index stops start-up before the model loads
            self.engine = AsyncEngine(LLMEngine(self.settings.engine), self.metrics)
            self.engine.start()
        except Exception as e:
            logger.error("could not load model %r: %s", self.settings.engine.model, e)
            self.load_error = str(e)
            if callable(self.on_load_failure):
                self.on_load_failure()
        finally:
            self.loaded.set()

    def _load_retrieval(self) -> Retrieval | None:
        s = self.settings
        if s.embedding_model is None:
            if s.rag_index:
                raise ValueError("--rag-index needs an embedding model")
            return None
        try:
            return Retrieval.load(s.embedding_model, s.rag_index)
        except FileNotFoundError as e:
            if s.rag_index or s.embedding_model != "default":
                raise
            logger.warning("serving without /v1/embeddings: %s", e)  # the default one is optional
            return None


def create_app(settings: ServerSettings) -> FastAPI:
    state = ServerState(settings, Metrics(settings.served_model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # load in the background so that /health can answer 503 while the weights are read
        threading.Thread(target=state.load, name="tokenmill-loader", daemon=True).start()
        yield
        state.draining = True
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="tokenmill", version=_version(), lifespan=lifespan)
    app.state.tokenmill = state
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)

    def ready() -> AsyncEngine:
        if state.engine is None or state.draining:
            raise unavailable(state.draining)
        return state.engine

    def authorized(request: Request) -> None:
        check_api_key(request, settings.api_key)

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{settings.served_model_name!r}", param="model", code="model_not_found")

    def check_queue(engine: AsyncEngine) -> None:
        if engine.num_waiting >= settings.max_queue:
            raise APIError(429, f"too many requests waiting ({settings.max_queue}); retry later", code="queue_full")

    @app.get("/health")
    async def health():
        if state.engine is not None and not state.draining:
            return {"status": "ok"}
        status = "draining" if state.draining else ("error" if state.load_error else "loading")
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/version")
    async def version_info():
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics():
        if state.engine is not None:
            state.metrics.set_expert_load(state.engine.engine.expert_load())
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)], responses=_ERRORS)
    async def models(engine: AsyncEngine = Depends(ready)):
        cards = [ModelCard(id=settings.served_model_name, max_model_len=engine.engine.max_model_len)]
        if state.retrieval is not None:
            cards.append(ModelCard(id=state.retrieval.encoder.name, max_model_len=state.retrieval.encoder.max_tokens))
        return ModelList(data=cards)

    def retrieval() -> Retrieval:
        if state.retrieval is None:
            raise APIError(404, "this server has no embedding model (see tokenmill serve --embedding-model)",
                           code="model_not_found")
        return state.retrieval

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS,
              dependencies=[Depends(authorized)])
    async def embeddings(req: EmbeddingRequest, _: AsyncEngine = Depends(ready)):
        return await retrieval().embeddings(req)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS,
              dependencies=[Depends(authorized)])
    async def chat_completions(req: ChatCompletionRequest, request: Request, engine: AsyncEngine = Depends(ready)):
        check_model(req.model)
        tok = engine.engine.tokenizer
        plan = plan_chat(req)
        messages, hits = [m.for_template() for m in req.messages], None
        if req.rag:
            messages, hits = await retrieval().ground(messages, req.rag)
        text = tok.apply_chat_template(messages, tools=plan.tools,
                                       add_generation_prompt=req.add_generation_prompt,
                                       **(req.chat_template_kwargs or {}))
        ids = tok.encode(text, add_special_tokens=False)
        max_tokens = _max_tokens(engine, len(ids), req.max_completion_tokens or req.max_tokens)
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None, plan.constraint)
        await check_compiles(engine.engine.grammars, plan)
        check_queue(engine)
        request_id = random_id("chatcmpl")
        outputs = _merge([engine.generate(request_id, text, ids, params)])
        # errors from the engine surface here, before any byte is sent
        first = await _unless_disconnected(request, _first(outputs))
        reply = fmt.ChatFormatter(request_id, settings.served_model_name, tok, params.n, req.top_logprobs or 0,
                                  plan.parse_tool_calls)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            events = reply.stream(_chain(first, outputs), usage)
            return _sse(events if hits is None else cited_stream(events, hits))
        final = await _unless_disconnected(request, _final_outputs(_chain(first, outputs)))
        body = reply.response(final[0])
        if hits is None:
            return body
        # the extra field would not survive response_model
        return JSONResponse(await asyncio.to_thread(cited_response, body, hits))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS,
              dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request, engine: AsyncEngine = Depends(ready)):
        check_model(req.model)
        tok = engine.engine.tokenizer
        prompts = _completion_prompts(req.prompt, tok)
        plan = plan_completion(req)
        submitted = []
        for text, ids in prompts:
            max_tokens = _max_tokens(engine, len(ids), req.max_tokens)
            submitted.append((text, ids, req.sampling_params(max_tokens, req.logprobs, plan.constraint)))
        await check_compiles(engine.engine.grammars, plan)
        check_queue(engine)
        request_id = random_id("cmpl")
        outputs = _merge([engine.generate(f"{request_id}-{i}", text, ids, params)
                          for i, (text, ids, params) in enumerate(submitted)])
        first = await _unless_disconnected(request, _first(outputs))
        reply = fmt.CompletionFormatter(request_id, settings.served_model_name, tok, req.n, len(prompts),
                                        req.echo, req.logprobs)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(reply.stream(_chain(first, outputs), usage))
        final = await _unless_disconnected(request, _final_outputs(_chain(first, outputs)))
        return reply.response([final[i] for i in range(len(prompts))])

    return app


def _version() -> str:
    try:
        return version("tokenmill")
    except PackageNotFoundError:
        return "0.0.0+local"


def _max_tokens(engine: AsyncEngine, prompt_len: int, requested: int | None) -> int:
    limit = engine.engine.max_model_len
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if requested is None:
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                                f"{prompt_len} tokens.", param="messages", code="context_length_exceeded")
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                            "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return requested


def _completion_prompts(prompt, tok) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) for each prompt of a completions request: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [(prompt, tok.encode(prompt))]
    if prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = prompt
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    result = []
    for p in prompts:
        if isinstance(p, str):
            result.append((p, tok.encode(p)))
        else:
            if any(t < 0 or t >= tok.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
            result.append((None, list(p)))
    return result


async def _merge(generators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def _first(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> tuple[int, RequestOutput]:
    try:
        return await outputs.__anext__()
    except ValueError as e:  # the engine rejected the request
        await outputs.aclose()
        raise APIError(400, str(e), code="invalid_value") from None


async def _final_outputs(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
    """Each prompt's last output (the finished one)."""
    return {i: out async for i, out in outputs}


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
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


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
                yield f"data: {data}\n\n"
        except Exception as e:  # after the headers are sent, an error can only travel as an event
            logger.warning("stream failed: %s", e)
            yield f"data: {json.dumps(json.loads(error_response(500, str(e)).body))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["create_app", "ServerSettings"]
