"""Runs the model on one scheduled step: builds the flat batch, owns the KV cache tensors.

Prefill steps run eagerly on tensors built for the step. Decode steps go through engine/decode_step.py's static
step (compiled on CPU, CUDA graphs on GPU) when the backend's kernels allow it and enforce_eager is off."""
import logging
from dataclasses import dataclass

import torch

from engine.decode_step import DecodeStep
from engine.sequence import Sequence
from kernels import TORCH, AttentionMetadata, Backend
from models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def kv_cache_dtype(setting: str, dtype: torch.dtype, quantization: str | None, backend: Backend) -> torch.dtype:
    """The KV cache's dtype for a model computing in `dtype`. "auto": float16 when GGUF blocks run on tokenmill's
    CPU kernels (llama.cpp's default cache: half the bytes a decode step's attention reads, and the model's weights
    are 4-bit anyway), else the model's own dtype. A cache narrower than the model needs the 'cpu' backend."""
    if setting == "auto":
        return torch.float16 if quantization == "gguf" and backend.name == "cpu" else dtype
    chosen = getattr(torch, setting)
    if chosen != dtype and not (chosen == torch.float16 and dtype == torch.float32 and backend.name == "cpu"):
        raise ValueError(f"kv_cache_dtype={setting!r} with a {str(dtype).removeprefix('torch.')} model and the "
                         f"{backend.name!r} backend: only the 'cpu' backend keeps a float16 cache for float32 models")
    return chosen


@dataclass
class _Row:
    """One position of a sequence, shaped as the decode step reads a sequence."""
    block_table: list[int]
    last_token_id: int
    num_tokens: int


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, backend: Backend = TORCH, max_num_seqs: int = 256,
                 max_model_len: int | None = None, enforce_eager: bool = True, kv_dtype: torch.dtype | None = None):
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        cfg = model.config
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # zeros, not empty: attention masks padded slots, and 0 * NaN from stale garbage would still be NaN
        self.k_cache = torch.zeros(shape, dtype=kv_dtype or dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype or dtype, device=device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache = self.k_cache[i]
            layer.self_attn.v_cache = self.v_cache[i]
        self.decode_step = None
        self.lora = None  # engine/lora.py's LoRAManager, with enable_lora
        self.prompt_logits: dict[int, torch.Tensor] = {}
        # CUDA graphs of the Triton kernels, or the compiled CPU step with the cpu backend (Triton's interpreter
        # on a CPU cannot be compiled)
        if not enforce_eager and backend.graph_safe and (device.type == "cuda") == (backend.name == "triton"):
            max_blocks = -(-(max_model_len or num_blocks * block_size) // block_size)
            self.decode_step = DecodeStep(model, backend, max_num_seqs, max_blocks, block_size, dtype, device)

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def _prepare_prefill(self, seqs: list[Sequence]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        context_lens = []
        for seq in seqs:
            start = seq.num_cached_tokens
            end = start + seq.num_scheduled_tokens
            input_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            for i in range(start // bs, -(-end // bs)):  # one range per block, not per token
                offset = seq.block_table[i] * bs - i * bs
                slots.extend(range(offset + max(start, i * bs), offset + min(end, (i + 1) * bs)))
            cu_seqlens.append(cu_seqlens[-1] + end - start)
            context_lens.append(end)
        meta = AttentionMetadata(
            is_prefill=True, slot_mapping=self._tensor(slots), block_tables=self._block_tables(seqs),
            context_lens=self._tensor(context_lens, torch.int32), cu_seqlens_q=self._tensor(cu_seqlens, torch.int32),
            max_seqlen_q=max(seq.num_scheduled_tokens for seq in seqs), backend=self.backend)
        last = self._tensor([c - 1 for c in cu_seqlens[1:]])
        return self._tensor(input_ids), self._tensor(positions), meta, last

    def _prepare_decode(self, seqs: list[Sequence]):
        bs = self.block_size
        positions = [seq.num_tokens - 1 for seq in seqs]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions)]
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=self._tensor(slots), block_tables=self._block_tables(seqs),
            context_lens=self._tensor([p + 1 for p in positions], torch.int32), backend=self.backend)
        return self._tensor([seq.last_token_id for seq in seqs]), self._tensor(positions), meta, None

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [sum of num_scheduled_tokens, vocab] at every position the step computes: a decode step with
        speculative proposals. Each position is a row of an ordinary decode step (its token, position and cache
        slot, the sequence's block table), so it computes exactly what decoding it alone would: every row's K/V is
        stored before any row attends, and a row's context ends at its own position."""
        rows = [_Row(seq.block_table, seq.all_token_ids[p], p + 1) for seq in seqs
                for p in range(seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens)]
        if self.lora is not None:
            self.lora.set_tokens([seq.lora_slot for seq in seqs for _ in range(seq.num_scheduled_tokens)])
        if self.decode_step is not None and len(rows) <= self.decode_step.max_num_seqs:
            return self.model.compute_logits(self.decode_step.run(rows))
        input_ids, positions, meta, _ = self._prepare_decode(rows)
        return self.model.compute_logits(self.model(input_ids, positions, meta))

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Next-token logits [len(seqs), vocab], float32. A prefill also leaves in `prompt_logits` the logits of
        every position it computed for the sequences that want prompt logprobs (seq_id -> [tokens, vocab])."""
        self.prompt_logits = {}
        if self.lora is not None:
            self.lora.set_tokens([seq.lora_slot for seq in seqs for _ in range(seq.num_scheduled_tokens)])
        if not is_prefill and self.decode_step is not None:
            return self.model.compute_logits(self.decode_step.run(seqs))
        prepare = self._prepare_prefill if is_prefill else self._prepare_decode
        input_ids, positions, meta, last = prepare(seqs)
        hidden = self.model(input_ids, positions, meta)
        if last is None or not any(seq.wants_prompt_logprobs for seq in seqs):
            return self.model.compute_logits(hidden if last is None else hidden[last])
        start = 0
        for seq, end in zip(seqs, last.tolist()):
            if seq.wants_prompt_logprobs:
                self.prompt_logits[seq.seq_id] = self.model.compute_logits(hidden[start:end + 1])
            start = end + 1
        return self.model.compute_logits(hidden[last])
