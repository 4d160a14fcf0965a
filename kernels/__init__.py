"""Attention backend and fused ops: paged KV store, variable-length prefill attention, paged decode attention,
RMSNorm (+ residual), SiLU-and-mul, rotary embedding.

Three implementations with the same signatures: plain torch (kernels/reference.py: the test oracle), Triton
(kernels/triton_attention.py, kernels/triton_ops.py: the CUDA path), and "cpu", tokenmill's C++ ops
(kernels/cpu_ops.py; attention reads K/V in place, and each token's result is bit-identical however it is
batched, chunked or cached): the CPU path where that extension builds, for float32 models. A backend
is `graph_safe` when its decode step can be compiled or captured whole (no host syncs, no branching on values).
`get_backend` picks one.
"""
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kernels import moe, reference

BACKENDS = ("auto", "triton", "cpu", "torch")


def cache_dir() -> Path:
    """Where tokenmill keeps what it builds, compiles or measures once per machine: the CPU kernels, inductor's
    code, the CPU path measurements ($TOKENMILL_CACHE_DIR, default ~/.cache/tokenmill)."""
    return Path(os.environ.get("TOKENMILL_CACHE_DIR") or Path.home() / ".cache" / "tokenmill")


# inductor fixes its cache directory the first time anything asks for it (building the CPU extension does), so it
# is named here, at import, rather than where the decode step compiles
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


@dataclass(frozen=True)
class Backend:
    name: str
    store_kv: Callable
    prefill_attention: Callable
    decode_attention: Callable
    rms_norm: Callable
    silu_and_mul: Callable
    rotary: Callable
    graph_safe: bool = False
    fused_moe: Callable = moe.fused_moe  # a Mixture-of-Experts layer's experts (kernels/moe.py)


TORCH = Backend("torch", reference.store_kv, reference.prefill_attention, reference.decode_attention,
                reference.rms_norm, reference.silu_and_mul, reference.rotary)


def _triton() -> Backend:
    attention = importlib.import_module("kernels.triton_attention")
    ops = importlib.import_module("kernels.triton_ops")
    experts = importlib.import_module("kernels.triton_moe")
    return Backend("triton", attention.store_kv, attention.prefill_attention, attention.decode_attention,
                   ops.rms_norm, ops.silu_and_mul, ops.rotary, graph_safe=True, fused_moe=experts.fused_moe)


def _cpu() -> Backend:
    ops = importlib.import_module("kernels.cpu_ops")
    ops.load()
    # the experts as one opaque op, so that the compiled decode step holds their data-dependent grouping whole
    return Backend("cpu", ops.store_kv, ops.prefill_attention, ops.decode_attention, ops.rms_norm, ops.silu_and_mul,
                   ops.rotary, graph_safe=True, fused_moe=moe.fused_moe_op)


def get_backend(name: str, device: torch.device) -> Backend:
    """'auto': Triton on CUDA; on a CPU "cpu" where its extension builds (kernels/cpu_ops.py), else torch.
    'triton' on a CPU needs TRITON_INTERPRET=1 set before start-up (the interpreter: slow, for tests)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        else:
            name = "cpu" if importlib.import_module("kernels.cpu_ops").missing() is None else "torch"
    if name == "torch":
        return TORCH
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError("attention_backend 'cpu' runs on the CPU only")
        reason = importlib.import_module("kernels.cpu_ops").missing()
        if reason:
            raise ValueError(f"attention_backend 'cpu' is unavailable here: {reason}")
        return _cpu()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter)")
    try:
        return _triton()
    except ImportError as e:
        raise ValueError(f"attention_backend 'triton' needs the triton package: {e}") from None


def for_dtype(backend: Backend, dtype: torch.dtype) -> Backend:
    """The backend to run a model of this dtype with: the cpu backend's C++ attention reads float32 caches only,
    so other dtypes take the torch reference."""
    return TORCH if backend.name == "cpu" and dtype != torch.float32 else backend


@dataclass
class AttentionMetadata:
    """What attention needs to know about one flat batch, built once per step by the model runner."""
    is_prefill: bool
    slot_mapping: torch.Tensor        # [num_tokens] cache slot of every new token
    block_tables: torch.Tensor        # [batch, max_blocks]
    context_lens: torch.Tensor        # [batch] tokens in context after this step
    cu_seqlens_q: torch.Tensor | None = None  # prefill only: [batch + 1] row offsets of each sequence's new tokens
    max_seqlen_q: int = 1                     # the most new tokens of one sequence in this step
    backend: Backend = field(default=TORCH)  # the kernels this step runs with


__all__ = ["AttentionMetadata", "Backend", "BACKENDS", "TORCH", "cache_dir", "for_dtype", "get_backend"]
