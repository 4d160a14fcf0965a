"""OpenAI's /v1/chat/completions and (legacy) /v1/completions: request -> the shared pipeline -> chat_format."""
import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server import chat_format as fmt
from server.async_engine import AsyncEngine
from server.constraints import plan_chat, plan_completion
from server.errors import APIError
from server.pipeline import Prompt, final_outputs, generate, max_tokens, render, sse
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                             random_id)
from server.retrieval import cited_response, cited_stream
from server.state import ERRORS, authorized, check_model, ready, retrieval, state_of

router = APIRouter(dependencies=[Depends(authorized)], responses=ERRORS)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(req: ChatCompletionRequest, request: Request, engine: AsyncEngine = Depends(ready)):
    check_model(request, req.model)
    plan = plan_chat(req)
    messages, hits = [m.for_template() for m in req.messages], None
    if req.rag:
        messages, hits = await retrieval(request).ground(messages, req.rag)
    prompt = render(request, engine, messages, plan, req.chat_template_kwargs, req.add_generation_prompt)
    budget = max_tokens(engine, len(prompt.token_ids), req.max_completion_tokens or req.max_tokens)
    params = req.sampling_params(budget, (req.top_logprobs or 0) if req.logprobs else None, plan.constraint,
                                 req.prompt_logprobs)
    request_id = random_id("chatcmpl")
    outputs = await generate(request, engine, request_id, [(prompt, params)], plan)
    reply = fmt.ChatFormatter(request_id, state_of(request).settings.served_model_name, engine.engine.tokenizer,
                              params.n, req.top_logprobs or 0, plan.parse_tool_calls, plan.reasoning,
                              req.prompt_logprobs)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        events = reply.stream(outputs, usage)
        return sse(events if hits is None else cited_stream(events, hits))
    body = reply.response((await final_outputs(request, outputs))[0])
    if hits is None:
        return body
    # the extra field would not survive response_model
    return JSONResponse(await asyncio.to_thread(cited_response, body, hits))


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, request: Request, engine: AsyncEngine = Depends(ready)):
    check_model(request, req.model)
    tok = engine.engine.tokenizer
    plan = plan_completion(req)
    # echo with logprobs: the prompt tokens' logprobs too (computed in the prefill, never from the prefix cache)
    asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    submitted = []
    for prompt in completion_prompts(req.prompt, tok):
        budget = max_tokens(engine, len(prompt.token_ids), req.max_tokens, prompt_param="prompt")
        submitted.append((prompt, req.sampling_params(budget, req.logprobs, plan.constraint,
                                                      max(asked) if asked else None)))
    request_id = random_id("cmpl")
    outputs = await generate(request, engine, request_id, submitted, plan)
    reply = fmt.CompletionFormatter(request_id, state_of(request).settings.served_model_name, tok, req.n,
                                    len(submitted), req.echo, req.logprobs, req.prompt_logprobs)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse(reply.stream(outputs, usage))
    final = await final_outputs(request, outputs)
    return reply.response([final[i] for i in range(len(submitted))])


def completion_prompts(prompt, tok) -> list[Prompt]:
    """Each prompt of a completions request: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [Prompt(prompt, tok.encode(prompt))]
    prompts = [prompt] if prompt and isinstance(prompt[0], int) else prompt
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    result = []
    for p in prompts:
        if isinstance(p, str):
            result.append(Prompt(p, tok.encode(p)))
        else:
            if any(t < 0 or t >= tok.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt")
            result.append(Prompt(None, list(p)))
    return result
