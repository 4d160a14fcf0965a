"""`tokenmill serve REWARD_MODEL`: a reward model (a `*ForSequenceClassification` checkpoint with one label, as
`tokenmill train reward` writes) served for scoring, in vLLM's /score shape:

    POST /score (or /v1/score) {"model": ..., "text_1": prompt or [prompts], "text_2": answer or [answers]}
    -> {"object": "list", "data": [{"index": i, "object": "score", "score": float}], "usage": {...}, ...}

One prompt with a list of answers scores each answer to it; two lists of equal length are scored pair by pair.
Each pair is rendered with the model's chat template as a user turn and the assistant's answer, exactly as the
reward model saw its training pairs, and the score is the raw reward (no sigmoid). /health, /v1/models and the
API key work as in the generation server."""
import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from models.reward import RewardModel, load_reward_model
from server.errors import APIError, BodySizeLimit, check_api_key, install_error_handlers, unavailable
from server.protocol import EmbeddingUsage, ErrorResponse, ModelCard, ModelList, _now, _Request, random_id

logger = logging.getLogger(__name__)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}


class ScoreRequest(_Request):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


@dataclass
class ScoreState:
    settings: object  # server.api.ServerSettings
    model: RewardModel | None = None
    tokenizer: object = None
    draining: bool = False
    load_error: str | None = None
    on_load_failure: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward at a time

    def load(self) -> None:
        try:
            self.model, self.tokenizer = load_reward_model(self.settings.engine.model)
        except Exception as e:
            logger.error("could not load reward model %r: %s", self.settings.engine.model, e)
            self.load_error = str(e)
            if callable(self.on_load_failure):
                self.on_load_failure()

    def score(self, pairs: list[tuple[str, str]]) -> tuple[list[float], int]:
        tok = self.tokenizer
        rows = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}],
                                                   add_generation_prompt=False), add_special_tokens=False)
                for q, a in pairs]
        limit = self.model.config.max_position_embeddings
        if (longest := max(map(len, rows))) > limit:
            raise APIError(400, f"a pair is {longest} tokens; the model takes at most {limit}", param="text_2")
        with self.lock:
            return self.model.score_ids(rows).tolist(), sum(map(len, rows))


def _pairs(req: ScoreRequest) -> list[tuple[str, str]]:
    first = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    second = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if not first or not second:
        raise APIError(400, "text_1 and text_2 must not be empty", param="text_1" if not first else "text_2")
    if len(first) == 1:
        return [(first[0], answer) for answer in second]
    if len(first) != len(second):
        raise APIError(400, f"text_1 has {len(first)} prompts and text_2 {len(second)} answers: give one prompt, "
                            "or as many prompts as answers", param="text_2")
    return list(zip(first, second))


def create_score_app(settings) -> FastAPI:
    state = ScoreState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="tokenmill-loader", daemon=True).start()
        yield
        state.draining = True

    app = FastAPI(title="tokenmill (reward model)", lifespan=lifespan)
    app.state.tokenmill = state
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)

    def ready() -> ScoreState:
        if state.model is None or state.draining:
            raise unavailable(state.draining)
        return state

    def authorized(request: Request) -> None:
        check_api_key(request, settings.api_key)

    @app.get("/health")
    async def health():
        if state.model is not None and not state.draining:
            return {"status": "ok"}
        status = "draining" if state.draining else ("error" if state.load_error else "loading")
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)], responses=_ERRORS)
    async def models(s: ScoreState = Depends(ready)):
        return ModelList(data=[ModelCard(id=settings.served_model_name,
                                         max_model_len=s.model.config.max_position_embeddings)])

    @app.post("/score", response_model=ScoreResponse, responses=_ERRORS, dependencies=[Depends(authorized)])
    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, dependencies=[Depends(authorized)])
    async def score(req: ScoreRequest, s: ScoreState = Depends(ready)):
        if req.model is not None and req.model != settings.served_model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{settings.served_model_name!r}", param="model", code="model_not_found")
        scores, tokens = await asyncio.to_thread(s.score, _pairs(req))
        return ScoreResponse(id=random_id("score"), model=settings.served_model_name,
                             data=[ScoreData(index=i, score=v) for i, v in enumerate(scores)],
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    return app
