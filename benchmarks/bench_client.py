"""The benchmark's own async client: streams requests to any OpenAI-compatible server and times every token.

A request is timed from the moment it is sent; a "token" is a streamed chunk that carries text (a chunk may carry
several tokens when a server holds back an incomplete character, which is why output tokens come from usage).
Load is either a fixed number of requests in flight (`concurrency`) or Poisson arrivals at `request_rate` per
second.
"""
import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

from benchmarks.bench_stats import RequestRecord


@dataclass
class BenchRequest:
    max_tokens: int
    prompt: str | list[int] | None = None       # /v1/completions
    messages: list[dict] | None = None          # /v1/chat/completions
    prompt_tokens: int = 0                      # known length; the usage chunk overrides it


class StreamError(Exception):
    pass


async def send(client: httpx.AsyncClient, model: str, request: BenchRequest, ignore_eos: bool = True,
               temperature: float = 0.0) -> RequestRecord:
    body: dict = {"model": model, "max_tokens": request.max_tokens, "temperature": temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's and llama.cpp's extra: fixes the output length
    if request.messages is not None:
        path, body["messages"] = "/v1/chat/completions", request.messages
    else:
        path, body["prompt"] = "/v1/completions", request.prompt
    start = time.perf_counter()
    ttft, last, gaps, chunks, usage = None, 0.0, [], 0, None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise StreamError(f"HTTP {response.status_code}: {text[:300]}")
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    raise StreamError(f"error event: {event['error']}")
                usage = event.get("usage") or usage
                text = "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                               for c in event.get("choices") or [])
                if text:
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                    chunks += 1
            if not done:
                raise StreamError("the stream ended without [DONE]")
    except (StreamError, httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestRecord(ok=False, start=start, end=time.perf_counter(), error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    return RequestRecord(ok=True, start=start, end=end,
                         prompt_tokens=usage["prompt_tokens"] if usage else request.prompt_tokens,
                         output_tokens=usage["completion_tokens"] if usage else chunks, ttft=ttft, itl=gaps)


async def run_load(base_url: str, model: str, requests: list[BenchRequest], concurrency: int | None = None,
                   request_rate: float | None = None, api_key: str | None = None, seed: int = 0,
                   ignore_eos: bool = True, timeout: float = 600.0) -> list[RequestRecord]:
    """Send every request, at most `concurrency` at a time, or arriving as a Poisson process at `request_rate`."""
    if concurrency is None and request_rate is None:
        raise ValueError("give concurrency or request_rate")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency or len(requests), max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency or len(requests) or 1)
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=30.0)) as client:
        async def one(request: BenchRequest) -> RequestRecord:
            async with gate:
                return await send(client, model, request, ignore_eos=ignore_eos)

        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(one(request)))
            if request_rate is not None:
                await asyncio.sleep(rng.expovariate(request_rate))
        return list(await asyncio.gather(*tasks))
