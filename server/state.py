"""What every route shares: the server's settings, its state (the engine once loaded, retrieval, draining), and
the dependencies that check a request before it reaches the engine (ready, authorized, the model's name)."""
import logging
import threading
from dataclasses import dataclass, field

from fastapi import Request

from engine import LLMEngine
from engine.config import EngineConfig
from server.async_engine import AsyncEngine
from server.errors import APIError, check_api_key, unavailable
from server.metrics import Metrics
from server.protocol import ErrorResponse
from server.retrieval import Retrieval

logger = logging.getLogger(__name__)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


@dataclass
class ServerSettings:
    engine: EngineConfig
    served_model_name: str = "default"
    api_key: str | None = None
    max_queue: int = 1024  # waiting requests beyond this get 429
    max_body_bytes: int = 4 * 2**20
    embedding_model: str | None = "default"  # behind /v1/embeddings and rag; None: neither
    rag_index: str | None = None
    reasoning_parser: str = "auto"  # text/reasoning.py: auto (from the chat template), none, or a convention
    allowed_origins: list[str] = field(default_factory=list)  # CORS
    max_stored_responses: int = 1000  # /v1/responses with store: the oldest are evicted beyond this
    lora_modules: dict[str, str] = field(default_factory=dict)  # --lora-modules name=path: adapters served at start


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
    loras: dict = field(default_factory=dict)  # adapter name -> engine.lora.LoRARequest (server/lora.py)
    responses: object = None  # server/responses.py's store of /v1/responses, made on first use

    def load(self) -> None:
        try:
            self.retrieval = self._load_retrieval()  # first: a bad index stops start-up before the model loads
            engine = LLMEngine(self.settings.engine)
            from server.lora import register  # adapters are checked against the loaded model before serving
            for name, path in self.settings.lora_modules.items():
                register(self, engine, name, path)
            self.engine = AsyncEngine(engine, self.metrics)
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


def state_of(request: Request) -> ServerState:
    return request.app.state.tokenmill


def ready(request: Request) -> AsyncEngine:
    """The engine, or 503 while the model loads or the server drains."""
    state = state_of(request)
    if state.engine is None or state.draining:
        raise unavailable(state.draining)
    return state.engine


def authorized(request: Request) -> None:
    check_api_key(request, state_of(request).settings.api_key)


def check_model(request: Request, name: str | None) -> None:
    """404 unless `name` is the served model or one of its LoRA adapters (which the request then runs with)."""
    state = state_of(request)
    served = state.settings.served_model_name
    request.state.lora = state.loras.get(name) if name is not None else None
    if name is not None and name != served and request.state.lora is None:
        adapters = f" and the adapters {', '.join(sorted(state.loras))}" if state.loras else ""
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}{adapters}",
                       param="model", code="model_not_found")


def retrieval(request: Request) -> Retrieval:
    found = state_of(request).retrieval
    if found is None:
        raise APIError(404, "this server has no embedding model (see tokenmill serve --embedding-model)",
                       code="model_not_found")
    return found
