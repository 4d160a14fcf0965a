"""Attention backend: paged KV store, variable-length prefill attention, paged decode attention.

Every kernel has a plain-torch reference with the same signature (kernels/reference.py); the engine uses it on the
CPU. Triton versions for CUDA arrive with their own module and must match the reference.
"""
from dataclasses import dataclass

import torch

from kernels.reference import decode_attention, prefill_attention, store_kv


@dataclass
class AttentionMetadata:
    """What attention needs to know about one flat batch, built once per step by the model runner."""
    is_prefill: bool
    slot_mapping: torch.Tensor        # [num_tokens] cache slot of every new token
    block_tables: torch.Tensor        # [batch, max_blocks]
    context_lens: torch.Tensor        # [batch] tokens in context after this step
    cu_seqlens_q: list[int] | None = None    # prefill only: row offsets of each sequence's new tokens
    context_lens_list: list[int] | None = None  # prefill only: context_lens as Python ints


__all__ = ["AttentionMetadata", "store_kv", "prefill_attention", "decode_attention"]
