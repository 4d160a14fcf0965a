"""Locust load test for tokenmill (or any OpenAI-compatible server): every user streams chat completions and
parses the server-sent events itself, so that time to first token and decode speed get rows of their own in
locust's statistics (web UI, console summary and CSV).

Headless, 8 users for 30 s, statistics written to benchmarks/results/locust_stats.csv (and _failures.csv):

    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8000 \\
        --csv benchmarks/results/locust

(add --only-summary to skip the periodic tables, --stop-timeout 30 to let answers under way finish at the end).

Rows (Type, Name) and what their columns mean:

    POST          /v1/chat/completions  the request end to end, from sending it to `data: [DONE]`, in ms.
                                        Its "size" is output tokens, not bytes (usage.completion_tokens of the
                                        usage chunk; 0 for a failure), so "Average Content Size" is the mean
                                        answer length. Failures are counted here.
    TTFT          first token           ms from sending the request to the first chunk with generated text.
    TOKENS_PER_S  decode                output tokens per second of one request after its first token:
                                        (tokens - 1) / (time of the last token - time of the first one).
                                        Locust only knows milliseconds, so in this row every "response time"
                                        column (median, average, min, max, percentiles) holds tokens/s, not ms.
                                        Locust rounds values above 100 to two significant digits in its
                                        percentiles (1234 tok/s shows as 1200); the average is exact.

The TTFT and TOKENS_PER_S samples are fired with `events.request.fire` for successful requests only: one TTFT
per answer, one TOKENS_PER_S per answer of two tokens or more that arrived in more than one chunk. The
"Aggregated" row mixes ms and tok/s and means nothing here.

A request fails (POST row, with the reason in the failures table) when the status is not 200, when the stream
carries an error event, when the connection breaks or sends something that is not JSON, or when the stream ends
without `data: [DONE]` or without a single generated token.

Environment:
    TOKENMILL_MODEL        the "model" field (default "default": what `tokenmill serve default` answers to;
                           the server's --served-model-name, or else its MODEL argument)
    TOKENMILL_API_KEY      sent as "Authorization: Bearer <key>" when set
    TOKENMILL_MAX_TOKENS   max_tokens of each request (default 64)
    TOKENMILL_IGNORE_EOS   1 (default): send the vLLM extension `ignore_eos: true`, so every answer is exactly
                           max_tokens long and the runs compare; 0: answers stop at the model's EOS
    TOKENMILL_TEMPERATURE  sampling temperature (default 0.7)
    TOKENMILL_PROMPTS      a JSONL file with one {"messages": [...]} object a line; each request picks one at
                           random (default: a dozen varied built-in chats)
    TOKENMILL_TIMEOUT      seconds before a request is given up as failed (default 600)
"""
import functools
import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, task

ENDPOINT = "/v1/chat/completions"

BUILT_IN_PROMPTS: list[list[dict]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea at night."}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Explain what a hash table is to a ten-year-old."}],
    [{"role": "user", "content": "Give me a simple recipe for pancakes, with quantities."}],
    [{"role": "user", "content": "Translate into German: 'The train leaves at seven tomorrow morning.'"}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "List five animals that live in the Arctic and one fact about each."}],
    [{"role": "system", "content": "You are a patient maths tutor."},
     {"role": "user", "content": "How do I add 3/4 and 2/3?"}],
    [{"role": "user", "content": "Summarise the plot of Romeo and Juliet in three sentences."}],
    [{"role": "user", "content": "Hi! How are you today?"},
     {"role": "assistant", "content": "I'm doing well, thank you. How can I help?"},
     {"role": "user", "content": "Suggest a name for a grey cat."}],
    [{"role": "user", "content": "What are the pros and cons of working from home? Answer as a list."}],
]


@functools.cache
def load_prompts(path: str | None) -> list[list[dict]]:
    """The chats to send: the JSONL file at `path` ({"messages": [...]} a line), or the built-in ones."""
    if not path:
        return BUILT_IN_PROMPTS
    chats = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        messages = json.loads(line).get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{number}: expected an object with a non-empty \"messages\" list")
        chats.append(messages)
    if not chats:
        raise ValueError(f"{path}: no prompts")
    return chats


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


class StreamFailed(Exception):
    """The stream itself said or showed that the request went wrong."""


class ChatStreamUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.prompts = load_prompts(os.environ.get("TOKENMILL_PROMPTS") or None)
        self.model = os.environ.get("TOKENMILL_MODEL", "default")
        self.max_tokens = int(os.environ.get("TOKENMILL_MAX_TOKENS", "64"))
        self.ignore_eos = _env_flag("TOKENMILL_IGNORE_EOS", True)
        self.temperature = float(os.environ.get("TOKENMILL_TEMPERATURE", "0.7"))
        self.timeout = float(os.environ.get("TOKENMILL_TIMEOUT", "600"))
        key = os.environ.get("TOKENMILL_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _fire(self, request_type: str, name: str, value: float, length: int = 0) -> None:
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=value,
                                             response_length=length, exception=None, context={})

    @staticmethod
    def _read_stream(response) -> tuple[float, float, int]:
        """Consume the SSE body: (time of the first token, time of the last one, output tokens)."""
        first_text = first_any = last = None
        chunks = 0
        usage_tokens = None
        done = False
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue  # blank separators, comments, "event:" lines
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                raise StreamFailed(f"not JSON in the stream: {data[:100]!r}") from None
            if not isinstance(event, dict):
                raise StreamFailed(f"unexpected event: {data[:100]!r}")
            if event.get("error"):
                error = event["error"]
                raise StreamFailed(f"error event: {error.get('message') if isinstance(error, dict) else error}")
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text or choice.get("finish_reason"):
                    now = time.perf_counter()
                    chunks += 1
                    if text and first_text is None:
                        first_text = now
                    if first_any is None:
                        first_any = now  # an answer with no text at all (an immediate EOS) still has a token
                    last = now
        if not done:
            raise StreamFailed("the stream ended without data: [DONE]")
        if first_any is None:
            raise StreamFailed("no token was streamed")
        # the usage chunk counts tokens exactly; without it (a server that ignores stream_options) every
        # chunk with text counts as one token, which a server that batches several tokens in a chunk undercounts
        tokens = usage_tokens if usage_tokens is not None else chunks
        return (first_text if first_text is not None else first_any), last, tokens

    @task
    def stream_chat(self) -> None:
        body = {"model": self.model, "messages": random.choice(self.prompts), "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        start = time.perf_counter()
        with self.client.post(ENDPOINT, json=body, headers=self.headers, stream=True, catch_response=True,
                              name=ENDPOINT, timeout=self.timeout) as response:
            result, problem = None, None
            if response.status_code == 0:  # no response at all: refused, reset, timed out
                problem = f"connection failed: {response.error}"
            elif response.status_code != 200:
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
            else:
                try:
                    result = self._read_stream(response)
                except StreamFailed as e:
                    problem = str(e)
                except Exception as e:  # a broken connection or a read timeout half way through the body
                    problem = f"reading the stream failed: {type(e).__name__}: {e}"
            # locust timed the POST until the response headers; make its row the whole exchange instead, and
            # its size the output tokens (0 for a failure) rather than bytes
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            response.request_meta["response_length"] = result[2] if result else 0
            if problem:
                response.failure(problem)
                return
            response.success()
        first, last, tokens = result
        self._fire("TTFT", "first token", (first - start) * 1000)
        if tokens > 1 and last > first:
            self._fire("TOKENS_PER_S", "decode", (tokens - 1) / (last - first), tokens)
