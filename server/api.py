"""The FastAPI app: start-up and shutdown, /health, /metrics, /version, /v1/models, and one router per API
surface, each in its own module:

    chat.py          /v1/chat/completions, /v1/completions (OpenAI)
    responses.py     /v1/responses (OpenAI's Responses API, stored responses included)
    messages.py      /v1/messages, /v1/messages/count_tokens (Anthropic)
    embeddings.py    /v1/embeddings
    tokenization.py  /tokenize, /detokenize (vLLM's shapes)
    lora.py          /v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's)
    web.py           the chat page at /

Every generating route goes through pipeline.py (render -> tokenize -> constrain -> engine -> outputs)."""
import threading
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import chat, embeddings, lora, messages, responses, tokenization, web
from server.async_engine import AsyncEngine
from server.errors import BodySizeLimit, install_error_handlers
from server.metrics import Metrics
from server.protocol import ModelCard, ModelList
from server.state import ERRORS, ServerSettings, ServerState, authorized, ready


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
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    install_error_handlers(app)

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

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)], responses=ERRORS)
    async def models(request: Request, engine: AsyncEngine = Depends(ready)):
        cards = [ModelCard(id=settings.served_model_name, max_model_len=engine.engine.max_model_len)]
        cards += [ModelCard(id=name, max_model_len=engine.engine.max_model_len, parent=settings.served_model_name,
                            root=lora.lora_path) for name, lora in state.loras.items()]
        if state.retrieval is not None:
            cards.append(ModelCard(id=state.retrieval.encoder.name, max_model_len=state.retrieval.encoder.max_tokens))
        return ModelList(data=cards)

    for module in (chat, responses, messages, embeddings, tokenization, lora, web):
        app.include_router(module.router)
    return app


def _version() -> str:
    try:
        return version("tokenmill")
    except PackageNotFoundError:
        return "0.0.0+local"


__all__ = ["create_app", "ServerSettings"]
