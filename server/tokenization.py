"""vLLM's /tokenize and /detokenize: a prompt (or a conversation, rendered by the chat template as a chat request
would be) to token ids, and token ids back to text."""
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from server.async_engine import AsyncEngine
from server.constraints import plan_chat
from server.errors import APIError
from server.pipeline import render
from server.protocol import ChatCompletionRequest, ChatMessage, Tool, _Request
from server.state import ERRORS, authorized, check_model, ready

router = APIRouter(dependencies=[Depends(authorized)], responses=ERRORS)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # for a prompt; a rendered conversation has its own
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(req: TokenizeRequest, request: Request, engine: AsyncEngine = Depends(ready)):
    check_model(request, req.model)
    tok = engine.engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt", code="invalid_value")
    if req.prompt is not None:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        chat = ChatCompletionRequest(messages=req.messages, tools=req.tools,
                                     chat_template_kwargs=req.chat_template_kwargs)
        ids = render(request, engine, [m.for_template() for m in req.messages], plan_chat(chat),
                     req.chat_template_kwargs, req.add_generation_prompt).token_ids
    strs = [tok.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.engine.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(req: DetokenizeRequest, request: Request, engine: AsyncEngine = Depends(ready)):
    check_model(request, req.model)
    tok = engine.engine.tokenizer
    bad = [t for t in req.tokens if not 0 <= t < engine.engine.vocab_size]
    if bad:
        raise APIError(400, f"token ids must be in [0, {engine.engine.vocab_size}); got {bad[0]}", param="tokens",
                       code="invalid_value")
    return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False))
