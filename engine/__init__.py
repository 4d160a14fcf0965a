"""The inference engine: continuous batching over a paged KV cache (LLM for offline use, LLMEngine for servers)."""
import logging

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

# like vLLM, show start-up facts (KV capacity, load time) unless the application configured logging itself
for _name in ("engine", "models"):
    _logger = logging.getLogger(_name)
    if not _logger.handlers and not logging.getLogger().handlers:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        _logger.addHandler(_handler)
        _logger.setLevel(logging.INFO)

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
