"""AsyncEngine: the engine loop in one background thread, feeding each request's asyncio queue.

The model's compute releases the GIL, so the event loop keeps serving HTTP while a step runs. Requests and aborts
reach the loop through a thread-safe inbox and join the batch between steps; outputs go back to each request's
queue with `loop.call_soon_threadsafe`. Only the loop thread touches the LLMEngine.
"""
import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine import LLMEngine, RequestOutput, SamplingParams
from server.metrics import Metrics

logger = logging.getLogger(__name__)


class RequestFailed(Exception):
    """The engine could not serve this request (it is aborted; the others go on)."""


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    last_output: float | None = None
    tokens: int = 0

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)
        self._spec_seen = (0, 0, 0)
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not finished (read from other threads: an estimate)."""
        return self._inbox.qsize() + len(self._streams)

    @property
    def num_waiting(self) -> int:
        return self._inbox.qsize() + self.engine.num_waiting

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it advances; closing the iterator early aborts the request."""
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop(), time.monotonic())
        self._inbox.put(("add", request_id, prompt, prompt_token_ids, params, stream, lora_request))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- the loop thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._update_gauges()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step fails the requests in flight, never the server
                logger.exception("engine step failed; aborting the requests in flight")
                self._fail_all(RequestFailed(f"the engine failed while serving this request: {e}"))
                continue
            now = time.monotonic()
            for out in outputs:
                self._emit(out, now)
            self._update_gauges()
        self._fail_all(RequestFailed("the server is shutting down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                _, request_id, prompt, prompt_token_ids, params, stream, lora_request = message
                try:
                    self.engine.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids,
                                            lora_request=lora_request)
                except (ValueError, FileNotFoundError) as e:
                    stream.put(e)
                    continue
                self._streams[request_id] = stream
            else:
                request_id = message[1]
                if self._streams.pop(request_id, None) is not None:
                    self.engine.abort_request(request_id)
                    self.metrics.request_finished("abort")

    def _emit(self, out: RequestOutput, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        m = self.metrics
        tokens = sum(len(o.token_ids) for o in out.outputs)
        m.generation_tokens.inc(tokens - stream.tokens)
        stream.tokens = tokens
        if stream.last_output is None:
            m.time_to_first_token.observe(now - stream.arrival)
            m.prompt_tokens.inc(len(out.prompt_token_ids))
            if out.first_scheduled_time is not None:
                m.request_queue_time.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
        else:
            m.inter_token_latency.observe(now - stream.last_output)
        stream.last_output = now
        if out.finished:
            m.e2e_request_latency.observe(now - stream.arrival)
            m.request_finished("error" if out.error else out.outputs[0].finish_reason or "abort")
            del self._streams[out.request_id]
        stream.put(RequestFailed(f"the engine failed while serving this request: {out.error}") if out.error else out)

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            self.metrics.request_finished("abort")
            stream.put(error)
        self._streams.clear()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.num_requests_running.set(self.engine.num_running)
        m.num_requests_waiting.set(self.engine.num_waiting)
        m.kv_cache_usage_perc.set(self.engine.kv_cache_usage)
        preemptions = self.engine.num_preemptions
        m.num_preemptions.inc(preemptions - self._preemptions_seen)
        self._preemptions_seen = preemptions
        bm = self.engine.block_manager
        m.prefix_cache_queries.inc(bm.prefix_queries - self._prefix_seen[0])
        m.prefix_cache_hits.inc(bm.prefix_hits - self._prefix_seen[1])
        self._prefix_seen = (bm.prefix_queries, bm.prefix_hits)
        if self.engine.lora is not None:
            sched = self.engine.scheduler
            names = lambda queue: [seq.lora_name for seq in queue if seq.lora_name]  # noqa: E731
            m.set_lora_requests(self.engine.config.max_loras, names(sched.running) + names(sched.prefilling),
                                names(sched.waiting))
        spec = self.engine.speculator
        if spec is not None:
            now = (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens)
            for counter, new, old in zip((m.spec_decode_num_drafts, m.spec_decode_num_draft_tokens,
                                          m.spec_decode_num_accepted_tokens), now, self._spec_seen):
                counter.inc(new - old)
            self._spec_seen = now
