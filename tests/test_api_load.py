"""The server under load: concurrent streams, clients that go away, a full queue, and a SIGTERM drain.

Metrics are read back from /metrics and must add up to what the clients received."""
import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer

pytestmark = pytest.mark.slow

MODEL = "smollm2"


def scrape(server: RunningServer) -> dict[tuple[str, str | None], float]:
    """(sample name, finished_reason label or None) -> value."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return {(s.name, s.labels.get("finished_reason")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(after: dict, before: dict, name: str, reason: str | None = None) -> float:
    key = (f"tokenmill:{name}", reason)
    return after.get(key, 0.0) - before.get(key, 0.0)


def wait_until_idle(server: RunningServer, timeout: float = 60.0) -> dict:
    """Metrics once nothing runs, nothing waits and no KV block is in use (fails after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(server)
        idle = (m[("tokenmill:num_requests_running", None)], m[("tokenmill:num_requests_waiting", None)],
                m[("tokenmill:kv_cache_usage_perc", None)]) == (0, 0, 0)
        if idle or time.monotonic() > deadline:
            assert idle, f"server not idle: {m}"
            return m
        time.sleep(0.2)


def test_32_concurrent_streams_finish_and_the_metrics_add_up(server):
    wait_until_idle(server)
    before = scrape(server)
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0,
                                timeout=300)

    async def one(i: int) -> dict:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count from {i} to {i + 5}, then name a color."}],
            temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
        return {"text": text, "finish": finish, "usage": usage}

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    for r in results:
        assert r["text"] and len(r["finish"]) == 1 and r["usage"] is not None
        assert r["usage"].completion_tokens <= 24
        if r["usage"].completion_tokens < 24:  # at exactly 24 the last token may still be the EOS
            assert r["finish"][0] == "stop"
    after = wait_until_idle(server)
    assert delta(after, before, "prompt_tokens_total") == sum(r["usage"].prompt_tokens for r in results)
    assert delta(after, before, "generation_tokens_total") == sum(r["usage"].completion_tokens for r in results)
    for reason in ("stop", "length"):
        assert delta(after, before, "request_success_total", reason) == sum(r["finish"][0] == reason
                                                                            for r in results)
    assert delta(after, before, "request_success_total", "abort") == 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(after, before, f"{histogram}_count") == 32
    tokens_after_first = sum(r["usage"].completion_tokens - 1 for r in results)
    assert 0 < delta(after, before, "inter_token_latency_seconds_count") <= tokens_after_first


def test_clients_that_disconnect_are_aborted_and_free_their_blocks(server):
    wait_until_idle(server)
    before = scrape(server)
    long_answer = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                   "max_tokens": 400, "ignore_eos": True, "temperature": 0.8}

    async def drop_mid_stream(http: httpx.AsyncClient) -> int:
        async with http.stream("POST", "/v1/chat/completions", json={**long_answer, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:  # the role chunk and two pieces of text, then hang up
                    return seen
        raise AssertionError("the stream ended before the client hung up")

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=120) as http:
            return await asyncio.gather(*(drop_mid_stream(http) for _ in range(20)))

    assert asyncio.run(main()) == [3] * 20
    after = wait_until_idle(server)
    assert delta(after, before, "request_success_total", "abort") == 20
    assert delta(after, before, "request_success_total", "length") == 0
    # each aborted request stopped long before its 400 tokens
    assert delta(after, before, "generation_tokens_total") < 20 * 100

    # non-streamed requests whose client times out are aborted too
    before = after
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=long_answer, headers=server.headers, timeout=1.5)
    after = wait_until_idle(server)
    assert delta(after, before, "request_success_total", "abort") == 1
    assert delta(after, before, "generation_tokens_total") < 400

    reply = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers, timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Name the capital of France."}],
        "temperature": 0, "max_tokens": 30})
    assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]


def test_a_shared_system_prompt_hits_the_prefix_cache(server):
    system = {"role": "system", "content": "You are a helpful assistant who answers in full sentences. " * 12}
    before = scrape(server)
    for question in ("What is the capital of France?", "What is two plus two?"):
        r = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers, timeout=60, json={
            "model": MODEL, "messages": [system, {"role": "user", "content": question}], "max_tokens": 4})
        assert r.status_code == 200
    after = wait_until_idle(server)
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert delta(after, before, "prefix_cache_queries_total") >= 2 * prompt_tokens - 20
    # the second request finds the system prompt's full blocks (at least 100 tokens of it)
    assert delta(after, before, "prefix_cache_hits_total") >= 100


@pytest.fixture
def tiny_server(tiny_checkpoint):
    """A tiny random model that runs one sequence at a time and lets one more wait."""
    running = RunningServer(str(tiny_checkpoint("llama")), "--served-model-name", "tiny", "--max-model-len", "512",
                            "--max-num-seqs", "1", "--max-queue", "1", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--grace-period", "60")
    yield running
    running.stop()


def _body(**kw) -> dict:
    return {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 500, "ignore_eos": True,
            "temperature": 0, **kw}


def _wait_for(server: RunningServer, name: str, value: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while scrape(server)[(f"tokenmill:{name}", None)] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_full_queue_gets_429_and_sigterm_drains_running_requests(tiny_server):
    s = tiny_server
    # A runs (one sequence at a time), B waits, C finds the queue full
    a_lines: list[str] = []
    a_open = threading.Event()

    def stream_a():
        with httpx.stream("POST", f"{s.base_url}/v1/completions", json=_body(stream=True, stream_options={"include_usage": True}), headers=s.headers,
                          timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    a_lines.append(line)
                    a_open.set()

    reader = threading.Thread(target=stream_a)
    reader.start()
    assert a_open.wait(60)
    _wait_for(s, "num_requests_running", 1)

    async def b_then_c():
        async with httpx.AsyncClient(base_url=s.base_url, headers=s.headers, timeout=120) as http:
            b = asyncio.ensure_future(http.post("/v1/completions", json=_body()))
            await asyncio.to_thread(_wait_for, s, "num_requests_waiting", 1)
            c = await http.post("/v1/completions", json=_body())
            b.cancel()  # B hangs up before its first token
            await asyncio.gather(b, return_exceptions=True)
            return c

    before = scrape(s)
    c = asyncio.run(b_then_c())
    assert c.status_code == 429 and c.json()["error"]["type"] == "rate_limit_error"
    _wait_for(s, "num_requests_waiting", 0)
    assert delta(scrape(s), before, "request_success_total", "abort") == 1  # B, which never ran

    # SIGTERM while A streams: no new work, A finishes all its tokens, the process exits 0
    assert scrape(s)[("tokenmill:num_requests_running", None)] == 1
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:
        refused = httpx.get(f"{s.base_url}/health", timeout=5).status_code == 503
    except httpx.TransportError:
        refused = True  # the listening socket is already closed
    assert refused
    assert s.proc.wait(120) == 0
    reader.join(30)
    assert a_lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in a_lines if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 500
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
