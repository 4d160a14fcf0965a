"""benchmarks/locustfile.py in a real headless locust run against a tiny-model server: locust exits 0 and its CSV
holds the chat request row (end to end, output tokens as size), the TTFT row and the tokens/s row, all without
failures, while the server's generation token counter grows by at least what the answers account for. And a
server that refuses the requests makes the run fail with the reason in the failures CSV."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LOCUST = Path(sys.executable).parent / "locust"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint):
    running = RunningServer(str(tiny_checkpoint("llama")), "--served-model-name", "tiny", "--max-model-len", "512",
                            "--kv-cache-memory", "64MiB", "--dtype", "float32")
    yield running
    running.stop()


def _generated_tokens(server: RunningServer) -> float:
    """tokenmill:generation_tokens_total, summed over its samples."""
    samples = [line for line in httpx.get(f"{server.base_url}/metrics", timeout=30).text.splitlines()
               if line.startswith("tokenmill:generation_tokens_total")]
    assert samples, "the server exports no tokenmill:generation_tokens_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in samples)


def _run_locust(server: RunningServer, prefix: Path, api_key: str | None, seconds: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENMILL_MODEL": "tiny", "TOKENMILL_MAX_TOKENS": str(MAX_TOKENS)}
    env.pop("TOKENMILL_API_KEY", None)
    env.pop("TOKENMILL_PROMPTS", None)
    if api_key:
        env["TOKENMILL_API_KEY"] = api_key
    return subprocess.run(
        [str(LOCUST), "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless", "-u", "4", "-r", "4",
         "-t", f"{seconds}s", "--host", server.base_url, "--csv", str(prefix), "--only-summary",
         "--exit-code-on-error", "1", "--stop-timeout", "20"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _rows(prefix: Path) -> dict[tuple[str, str], dict]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_headless_run_reports_ttft_and_tokens_per_second(tiny_server, tmp_path):
    assert LOCUST.is_file(), f"no locust next to {sys.executable}"
    before = _generated_tokens(tiny_server)
    run = _run_locust(tiny_server, tmp_path / "run", tiny_server.api_key, seconds=10)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]

    rows = _rows(tmp_path / "run")
    chat, ttft, speed = ("POST", "/v1/chat/completions"), ("TTFT", "first token"), ("TOKENS_PER_S", "decode")
    for key in (chat, ttft, speed):
        assert key in rows, f"no {key} row in {sorted(rows)}"
        assert int(rows[key]["Request Count"]) > 0, rows[key]
        assert int(rows[key]["Failure Count"]) == 0, rows[key]
    requests = int(rows[chat]["Request Count"])
    # one TTFT and one tokens/s sample per answered request
    assert int(rows[ttft]["Request Count"]) == requests and int(rows[speed]["Request Count"]) == requests
    # EOS is ignored, so every answer is exactly MAX_TOKENS long; the chat row's size is output tokens
    assert float(rows[chat]["Average Content Size"]) == MAX_TOKENS
    # the chat row runs to [DONE], so it is never shorter than the time to the first token
    assert float(rows[chat]["Average Response Time"]) >= float(rows[ttft]["Average Response Time"]) > 0
    # tokens/s: 15 tokens after the first, at some positive rate below a silly bound
    assert 0 < float(rows[speed]["Average Response Time"]) < 1_000_000
    assert _generated_tokens(tiny_server) - before >= MAX_TOKENS * requests


def test_refused_requests_fail_the_run(tiny_server, tmp_path):
    run = _run_locust(tiny_server, tmp_path / "denied", "not-the-key", seconds=3)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-4000:]
    rows = _rows(tmp_path / "denied")
    chat = rows[("POST", "/v1/chat/completions")]
    assert int(chat["Failure Count"]) == int(chat["Request Count"]) > 0
    assert ("TTFT", "first token") not in rows
    with open(tmp_path / "denied_failures.csv", newline="") as f:
        errors = [row["Error"] for row in csv.DictReader(f)]
    assert errors and all("HTTP 401" in error for error in errors), errors


# ---- failures the stream itself shows, from a fake server that answers each request in a different broken way ----

_CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
_LAST = {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "length"}]}
_USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
_BROKEN_STREAMS = {
    "error event": [_CHUNK, {"error": {"message": "the engine failed", "type": "server_error"}}, "[DONE]"],
    "the stream ended without data: [DONE]": [_CHUNK, _LAST, _USAGE],
    "not JSON in the stream": [_CHUNK, "{oops", "[DONE]"],
    "no token was streamed": [_USAGE, "[DONE]"],
    "reading the stream failed": None,  # the connection closes before the promised body length
    "": [_CHUNK, _LAST, _USAGE, "[DONE]"],  # a good one
}


@pytest.fixture
def broken_server():
    import itertools
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    modes = itertools.cycle(_BROKEN_STREAMS.values())
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                events = next(modes)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            if events is None:
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(f"data: {json.dumps(_CHUNK)}\n\n".encode())
                return  # HTTP/1.0: the connection closes with 1000 bytes promised
            self.end_headers()
            for event in events:
                self.wfile.write(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_broken_streams_are_failures_with_their_reason(broken_server, tmp_path):
    class Address:  # what _run_locust needs of a server
        base_url = f"http://127.0.0.1:{broken_server.server_address[1]}"

    run = _run_locust(Address(), tmp_path / "broken", None, seconds=4)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-4000:]
    rows = _rows(tmp_path / "broken")
    chat = rows[("POST", "/v1/chat/completions")]
    failed, total = int(chat["Failure Count"]), int(chat["Request Count"])
    assert total >= len(_BROKEN_STREAMS) and 0 < failed < total
    # only the good answers have a TTFT sample
    assert int(rows[("TTFT", "first token")]["Request Count"]) == total - failed
    with open(tmp_path / "broken_failures.csv", newline="") as f:
        errors = [row["Error"] for row in csv.DictReader(f)]
    for reason in filter(None, _BROKEN_STREAMS):
        assert any(reason in error for error in errors), (reason, errors)
