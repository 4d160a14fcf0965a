"""The decode step in a static layout: compiled on CPU, captured as CUDA graphs and replayed on GPU.

Persistent input buffers sized for max_num_seqs (token ids, positions, cache slots, block tables, context lengths)
and an output buffer for the final hidden states. A step writes its batch into the first rows, one copy per
field, and runs the model on a bucket of rows:
- CUDA: the batch is padded to the next bucket size (1, 2, 4, 8, then every 16, as nano-vllm does); one graph per
  bucket is captured at start-up, largest first, all in one memory pool. Padded rows have slot -1 (the K/V store
  skips them) and context length 0, so they write nothing and read nothing that real rows could see.
- CPU: the step runs `torch.compile`d with inductor (fusing norm + residual, rotary, SiLU-and-mul and the K/V
  store around the GEMMs), on exactly the batch's rows: the batch dimension is dynamic, so one compiled graph
  serves every size and no padded row costs compute. Compiled code is cached on disk (torch's inductor caches,
  under TOKENMILL_CACHE_DIR), so the second start is quick.
Nothing inside the step synchronises with the host, allocates host memory or branches on tensor values; the output
head runs after the step on the real rows only.
"""
import itertools
import logging
import time
import types
from dataclasses import dataclass

import torch

from engine.sequence import Sequence
from kernels import AttentionMetadata, Backend
from models.cpu_linear import CPULinear
from models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def _own_code(method: types.MethodType) -> types.MethodType:
    """`method` with a copy of its code object: dynamo keeps compiled graphs (and their guards) per code object."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_instances)}")
    return types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__),
                            method.__self__)


_instances = itertools.count()


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a captured graph: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always one)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


@dataclass
class DecodeBuffers:
    input_ids: torch.Tensor     # [max_num_seqs] int64
    positions: torch.Tensor     # [max_num_seqs] int64
    slot_mapping: torch.Tensor  # [max_num_seqs] int64, -1 in padded rows
    block_tables: torch.Tensor  # [max_num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [max_num_seqs] int32, 0 in padded rows
    hidden: torch.Tensor        # [max_num_seqs, hidden_size] the step's output (CUDA graphs write it)

    @classmethod
    def allocate(cls, max_num_seqs: int, max_blocks: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> "DecodeBuffers":
        def ints(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)
        return cls(ints(max_num_seqs), ints(max_num_seqs), ints(max_num_seqs).fill_(-1),
                   ints(max_num_seqs, max_blocks, dtype=torch.int32), ints(max_num_seqs, dtype=torch.int32),
                   torch.zeros(max_num_seqs, hidden_size, dtype=dtype, device=device))


class DecodeStep:
    """Runs decode steps of `model` from persistent buffers, compiled (CPU) or as CUDA graphs."""

    def __init__(self, model: LlamaForCausalLM, backend: Backend, max_num_seqs: int, max_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.buffers = DecodeBuffers.allocate(max_num_seqs, max_blocks, model.config.hidden_size, dtype, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.buckets: list[int] = []
        if device.type == "cuda":
            self._capture()
        else:
            # CPULinear (and int4) pick their kernel by the number of rows, a branch that needs the batch size
            self._one_graph = not any(isinstance(m, CPULinear) for m in model.modules())
            # the compiled code need not depend on the KV pool's size or the table width: one artifact in the disk
            # cache serves every such setting
            for layer in model.layers:
                torch._dynamo.mark_dynamic(layer.self_attn.k_cache, 0)
                torch._dynamo.mark_dynamic(layer.self_attn.v_cache, 0)
            # cpp_wrapper: the compiled step calls its ~400 kernels from C++ rather than from a Python wrapper,
            # whose per-call cost was a third of a single-stream step (~5 of 15 ms, SmolLM2 on 2 cores). No guards
            # on the model's modules and parameters (~1 ms per call for 300 tensors): they never change under an
            # engine, and the step's code object is this instance's own, so no other model can reuse its graphs.
            # cpp_wrapper_build_separate: the wrapper and the fused kernels compile as two files, which halves the
            # first compile (155 -> 78 s for SmolLM2 on 2 Zen 3 cores) at no measured cost per step (8.02 vs 7.98 ms,
            # alternated in one process)
            options = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True,
                       "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self._compiled = torch.compile(_own_code(self._forward), backend="inductor", fullgraph=True,
                                           options=options)
            self._warm_up()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slot_mapping, block_tables=block_tables,
                                 context_lens=context_lens, backend=self.backend)
        return self.model(input_ids, positions, meta)

    def _inputs(self, rows: int) -> tuple[torch.Tensor, ...]:
        """The first `rows` rows of every input buffer; block tables at their full width, which the attention
        kernels read only up to each context length."""
        b = self.buffers
        return b.input_ids[:rows], b.positions[:rows], b.slot_mapping[:rows], b.block_tables[:rows], \
            b.context_lens[:rows]

    def _compiled_call(self, rows: int) -> torch.Tensor:
        inputs = self._inputs(rows)
        torch._dynamo.mark_dynamic(inputs[3], 1)
        for t in inputs:
            if self._one_graph:  # no shape branches: one graph for every batch size, 1 included
                torch._dynamo.decorators.mark_unbacked(t, 0)
            elif rows > 1:  # one graph for every batch size > 1 (size 1 gets its own, specialised)
                torch._dynamo.mark_dynamic(t, 0)
        return self._compiled(*inputs)

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        self.buckets = graph_buckets(self.max_num_seqs)
        pool = None
        for rows in reversed(self.buckets):  # largest first: the smaller graphs fit in its memory
            inputs = self._inputs(rows)
            self.buffers.hidden[:rows] = self._forward(*inputs)  # warm-up: Triton compiles its kernels here
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.buffers.hidden[:rows] = self._forward(*inputs)
            pool = graph.pool() if pool is None else pool
            self.graphs[rows] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("CUDA graphs: %d decode batch sizes (1-%d) captured in %.1f s, %.0f MiB",
                    len(self.buckets), self.max_num_seqs, time.perf_counter() - start, used / 2**20)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile at start-up rather than in the first request: the graph of batch size 1 and the one of every
        larger size. The dummy tokens write slot 0, which any sequence given it rewrites before reading."""
        b = self.buffers
        sizes = (1,) if self._one_graph or self.max_num_seqs == 1 else (1, 2)
        b.slot_mapping[:len(sizes)] = torch.arange(len(sizes))
        b.context_lens[:len(sizes)] = 1
        for rows in sizes:
            start = time.perf_counter()
            self._compiled_call(rows)
            what = "every batch size" if self._one_graph else "one sequence" if rows == 1 else "batches"
            logger.info("compiled the decode step for %s in %.1f s", what, time.perf_counter() - start)

    def _fill(self, seqs: list[Sequence], rows: int) -> None:
        """Write the batch into the first `rows` buffer rows (rows past the batch become padding)."""
        bs, n, b = self.block_size, len(seqs), self.buffers
        positions = [seq.num_tokens - 1 for seq in seqs]
        slots = [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions)]
        pad = rows - n
        width = max(len(seq.block_table) for seq in seqs)
        # table entries past a sequence's context are never read; stale ids from earlier steps are valid ones
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs]
        host = torch.tensor([[seq.last_token_id for seq in seqs] + [0] * pad, positions + [0] * pad,
                             slots + [-1] * pad, [p + 1 for p in positions] + [0] * pad], dtype=torch.int64)
        b.input_ids[:rows].copy_(host[0], non_blocking=True)
        b.positions[:rows].copy_(host[1], non_blocking=True)
        b.slot_mapping[:rows].copy_(host[2], non_blocking=True)
        b.context_lens[:rows].copy_(host[3], non_blocking=True)
        b.block_tables[:n, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Final hidden states [len(seqs), hidden_size] of one decode step."""
        n = len(seqs)
        if self.graphs:
            rows = next(r for r in self.buckets if r >= n)
            self._fill(seqs, rows)
            self.graphs[rows].replay()
            return self.buffers.hidden[:n]
        self._fill(seqs, n)
        return self._compiled_call(n)
