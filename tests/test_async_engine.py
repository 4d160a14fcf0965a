"""AsyncEngine: the engine thread feeds asyncio queues; a failing request fails alone; closing a stream aborts."""
import asyncio

import pytest

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from server.async_engine import AsyncEngine, RequestFailed
from server.metrics import Metrics


@pytest.fixture
def async_engine(tiny_checkpoint):
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=64,
                                    max_model_len=256))
    running = AsyncEngine(engine, Metrics("tiny"))
    yield running
    running.shutdown()


def _count(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("tokenmill:request_success_total",
                                             {"model_name": "tiny", "finished_reason": reason}) or 0.0


async def _collect(engine: AsyncEngine, request_id: str, params: SamplingParams):
    last = None
    async for out in engine.generate(request_id, None, [5, 6, 7, 8], params):
        last = out
    return last


def test_a_failing_request_fails_alone(async_engine):
    real_run = async_engine.engine.runner.run

    def run(seqs, is_prefill):
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("kernel exploded")
        return real_run(seqs, is_prefill)
    async_engine.engine.runner.run = run
    async_engine.start()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(_collect(async_engine, rid, params) for rid in ("a", "bad", "b")),
                                    return_exceptions=True)

    a, bad, b = asyncio.run(main())
    assert isinstance(bad, RequestFailed) and "kernel exploded" in str(bad)
    assert len(a.outputs[0].token_ids) == len(b.outputs[0].token_ids) == 10
    assert a.outputs[0].token_ids == b.outputs[0].token_ids  # same prompt, greedy
    assert _count(async_engine.metrics, "error") == 1 and _count(async_engine.metrics, "length") == 2


def test_closing_a_stream_aborts_its_request(async_engine):
    async_engine.start()
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = async_engine.generate("r", None, [5, 6, 7], params)
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                break
        await stream.aclose()
        for _ in range(200):  # the abort reaches the engine thread within a step or two
            if not async_engine.engine.has_unfinished_requests() and _count(async_engine.metrics, "abort"):
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not async_engine.engine.has_unfinished_requests()
    assert async_engine.engine.kv_cache_usage == 0
    assert _count(async_engine.metrics, "abort") == 1
