"""Attention backend and fused ops: paged KV store, variable-length prefill attention, paged decode attention,
RMSNorm (+ residual), SiLU-and-mul, rotary embedding.

Two implementations with the same signatures: plain torch (kernels/reference.py: the CPU path and the test
oracle) and Triton (kernels/triton_attention.py, kernels/triton_ops.py: the CUDA path). `get_backend` picks one.
"""
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from kernels import reference

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Backend:
    name: str
    store_kv: Callable
    prefill_attention: Callable
    decode_attention: Callable
    rms_norm: Callable
    silu_and_mul: Callable
    rotary: Callable


TORCH = Backend("torch", reference.store_kv, reference.prefill_attention, reference.decode_attention,
                reference.rms_norm, reference.silu_and_mul, reference.rotary)


def _triton() -> Backend:
    attention = importlib.import_module("kernels.triton_attention")
    ops = importlib.import_module("kernels.triton_ops")
    return Backend("triton", attention.store_kv, attention.prefill_attention, attention.decode_attention,
                   ops.rms_norm, ops.silu_and_mul, ops.rotary)


def get_backend(name: str, device: torch.device) -> Backend:
    """'auto': Triton on CUDA, torch elsewhere. 'triton' on a CPU needs TRITON_INTERPRET=1 set before start-up
    (the interpreter: slow, for tests)."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TORCH
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter)")
    try:
        return _triton()
    except ImportError as e:
        raise ValueError(f"attention_backend 'triton' needs the triton package: {e}") from None


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


__all__ = ["AttentionMetadata", "Backend", "BACKENDS", "TORCH", "get_backend"]
