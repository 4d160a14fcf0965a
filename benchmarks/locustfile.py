"""Locust load test for any OpenAI-compatible server: users stream chat completions, and time to first token and
decode speed get rows of their own in locust's statistics (web UI, console and CSV).

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000 \\
        --csv benchmarks/results/locust --only-summary

Rows (type, name):
    POST          /v1/chat/completions   until the response headers arrive (locust's own measure)
    STREAM        e2e                    the whole streamed answer in ms; "size" is its output tokens
    TTFT          first token            ms from sending the request to the first streamed text
    TOKENS_PER_S  decode                 output tokens per second after the first one. Locust only knows ms, so
                                         this row's "response time" columns hold tok/s, not ms.
A failed request (HTTP error, an error event in the stream, no [DONE]) counts as a failure of its POST row.

Environment: TOKENMILL_MODEL (default "default"), TOKENMILL_API_KEY, TOKENMILL_MAX_TOKENS (64),
TOKENMILL_IGNORE_EOS (1: every answer is exactly max tokens long), TOKENMILL_PROMPTS (a JSONL file of
{"messages": [...]} lines; default: a few built-in questions).
"""
import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, task

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "List three fruits."}],
    [{"role": "user", "content": "Explain what a hash table is to a child."}],
    [{"role": "user", "content": "Give me a recipe for pancakes."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]


def _prompts() -> list[list[dict]]:
    path = os.environ.get("TOKENMILL_PROMPTS")
    if not path:
        return PROMPTS
    return [json.loads(line)["messages"] for line in Path(path).read_text().splitlines() if line.strip()]


class ChatStreamUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.prompts = _prompts()
        self.model = os.environ.get("TOKENMILL_MODEL", "default")
        self.max_tokens = int(os.environ.get("TOKENMILL_MAX_TOKENS", "64"))
        self.ignore_eos = os.environ.get("TOKENMILL_IGNORE_EOS", "1") not in ("0", "false", "")
        key = os.environ.get("TOKENMILL_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _record(self, kind: str, name: str, value: float, size: int = 0) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=value,
                                             response_length=size, exception=None, context={})

    @task
    def stream_chat(self) -> None:
        body = {"model": self.model, "messages": random.choice(self.prompts), "max_tokens": self.max_tokens,
                "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        start = time.perf_counter()
        first, chunks, tokens = None, 0, None
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                              catch_response=True, name="/v1/chat/completions") as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            done = False
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    response.failure(f"error event: {event['error'].get('message')}")
                    return
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                    chunks += 1
                    first = first or time.perf_counter()
            if not done or first is None:
                response.failure("the stream ended without [DONE]" if not done else "no text was streamed")
                return
            response.success()
        end = time.perf_counter()
        tokens = tokens if tokens is not None else chunks
        self._record("STREAM", "e2e", (end - start) * 1000, tokens)
        self._record("TTFT", "first token", (first - start) * 1000)
        if tokens > 1 and end > first:
            self._record("TOKENS_PER_S", "decode", (tokens - 1) / (end - first), tokens)
