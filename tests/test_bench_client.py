"""serve_bench's client against a fake OpenAI server whose delays are known: the numbers it reports are the delays."""
import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.bench_client import BenchRequest, run_load
from benchmarks.bench_stats import summarize

# a prompt "ttft,itl,mode" asks the fake server for those delays (seconds)
TOLERANCE = 0.06  # scheduling noise on a busy 2-core machine


def fake_app() -> FastAPI:
    app = FastAPI()
    app.state.in_flight = app.state.most_in_flight = 0

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        ttft, itl, mode = body["prompt"].split(",")
        if mode == "http500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        async def events():
            app.state.in_flight += 1
            app.state.most_in_flight = max(app.state.most_in_flight, app.state.in_flight)
            try:
                await asyncio.sleep(float(ttft))
                for i in range(body["max_tokens"]):
                    if i:
                        await asyncio.sleep(float(itl))
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': f't{i}'}]})}\n\n"
                    if mode == "cut" and i == 1:
                        return  # the stream breaks off: no [DONE]
                if mode != "nousage":
                    usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"], "total_tokens": 0}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                app.state.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = fake_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)


def _requests(ttfts: list[float], itl: float, tokens: int, mode: str = "ok") -> list[BenchRequest]:
    return [BenchRequest(max_tokens=tokens, prompt=f"{t},{itl},{mode}", prompt_tokens=3) for t in ttfts]


def test_reported_ttft_itl_and_percentiles_match_the_known_delays(fake_server):
    url, app = fake_server
    ttfts = [0.05 * i for i in range(1, 11)]  # 0.05 .. 0.5 s
    records = asyncio.run(run_load(url, "m", _requests(ttfts, 0.03, 5), concurrency=10))
    s = summarize(records, "fake", 10)
    assert s.errors == 0 and s.completed == 10
    # known: p50 = 0.275, p90 = 0.455, p99 = 0.4955 (linear interpolation); measured adds only overhead
    for measured, expected in ((s.ttft.p50, 0.275), (s.ttft.p90, 0.455), (s.ttft.p99, 0.4955)):
        assert expected <= measured <= expected + TOLERANCE
    assert sorted(r.ttft for r in records) == pytest.approx(ttfts, abs=TOLERANCE)
    assert all(len(r.itl) == 4 for r in records)
    assert 0.03 - 0.005 <= s.itl.p50 <= 0.03 + TOLERANCE and s.itl.p99 <= 0.03 + TOLERANCE * 2
    assert s.tpot.p50 == pytest.approx(0.03, abs=TOLERANCE)
    assert all(r.output_tokens == 5 and r.prompt_tokens == 7 for r in records)  # from the usage chunk
    assert s.output_throughput == pytest.approx(50 / s.duration)
    assert 0.5 + 4 * 0.03 <= s.duration <= 0.5 + 4 * 0.03 + 2 * TOLERANCE
    assert app.state.most_in_flight == 10


def test_concurrency_caps_requests_in_flight(fake_server):
    url, app = fake_server
    app.state.most_in_flight = 0
    records = asyncio.run(run_load(url, "m", _requests([0.1] * 6, 0.01, 2), concurrency=2))
    assert app.state.most_in_flight == 2
    # three waves of two requests, each ~0.11 s
    assert 0.33 <= summarize(records).duration <= 0.33 + 3 * TOLERANCE


def test_request_rate_spreads_arrivals(fake_server):
    url, _ = fake_server
    records = asyncio.run(run_load(url, "m", _requests([0.0] * 20, 0.0, 1), request_rate=50.0, seed=1))
    starts = sorted(r.start for r in records)
    span = starts[-1] - starts[0]
    assert 0.1 < span < 1.5  # 19 exponential gaps of mean 20 ms: about 0.38 s


def test_failures_are_counted_not_timed(fake_server):
    url, _ = fake_server
    requests = (_requests([0.01], 0.01, 3, "http500") + _requests([0.01], 0.01, 3, "cut")
                + _requests([0.01], 0.01, 3, "nousage"))
    records = asyncio.run(run_load(url, "m", requests, concurrency=3))
    bad500, cut, nousage = records
    assert not bad500.ok and "HTTP 500" in bad500.error and "boom" in bad500.error
    assert not cut.ok and "[DONE]" in cut.error
    assert nousage.ok and nousage.output_tokens == 3 and nousage.prompt_tokens == 3  # counted from the chunks
    s = summarize(records)
    assert s.errors == 2 and s.completed == 1 and s.ttft.p50 == nousage.ttft
