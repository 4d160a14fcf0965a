"""EngineConfig: the one place engine settings live."""
import re
from dataclasses import dataclass

KV_CACHE_DTYPES = ("auto", "float32", "float16")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    """2147483648, "2GiB", "512MB" -> bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory must be bytes or a size like '2GiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class EngineConfig:
    model: str = "default"
    dtype: str = "auto"
    device: str | None = None            # None: cuda when available, else cpu
    max_model_len: int | None = None      # None: the model's, capped by the KV cache capacity
    max_num_seqs: int = 256               # most sequences running at once
    max_num_batched_tokens: int | None = None  # prefill tokens per step (the chunk size); None: 512 CPU, 2048 CUDA
    enable_prefix_caching: bool = True    # reuse the KV blocks of equal prompt prefixes
    kv_cache_memory: int | str | None = None   # bytes for the KV cache; None: 2 GiB on CPU, 90% of free on CUDA
    num_kv_blocks: int | None = None      # fixes the pool size outright (tests, small machines)
    block_size: int = 16
    seed: int = 0                         # seeds the draws of requests that give no seed of their own
    attention_backend: str = "auto"       # kernels: "triton" on CUDA, "torch" elsewhere, or forced
    quantization: str | None = None       # "int4" / "int8": CPU weight quantization (models/quantize.py); not invariant
    enforce_eager: bool = False           # no compiled decode step (CPU) and no CUDA graphs (GPU)
    kv_cache_dtype: str = "auto"          # "auto": float16 for GGUF blocks on the CPU kernels, else the model's;
                                          # or "float32" / "float16" (engine/model_runner.py: kv_cache_dtype)
    load_format: str = "auto"             # "dummy": random weights of the checkpoint's shapes (benchmarks)
    speculative_config: dict | None = None  # vLLM's keys: engine/speculative.py
    enable_lora: bool = False             # serve LoRA adapters (engine/lora.py); decode steps then run eagerly
    max_loras: int = 4                    # adapters resident at once
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "max_num_batched_tokens", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
            if self.kv_cache_memory <= 0:
                raise ValueError("kv_cache_memory must be positive")
