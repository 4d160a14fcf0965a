"""quantization="gguf" for Mixture-of-Experts layers: the experts compute with the file's own Q4_1 / Q8_0 blocks, and
every token's layer output stays bit-identical whatever else shares the step and whichever step computes it (eager
prefill or compiled decode), as the dense gguf path's is.

- GGUFExperts replaces SparseMoE.experts: each expert's packed gate+up and down blocks, stacked [E, ...]; a step's
  (token, slot) pairs are grouped by expert exactly as kernels/moe.py groups them and each expert that received any
  runs tokenmill's quantized linear once over its rows (gate/up, SiLU-and-mul, down). Those ops give every output row
  bit-identical results whatever the other rows, and combine() adds a token's pairs in a fixed order, so a token's
  output depends on its own row only.
- The router and Qwen2-MoE's shared-expert gate stay float32 (llama.cpp keeps them F32 in every file it writes)
  but become InvariantLinear: torch's float32 GEMM rounds a row differently with the number of rows in the call,
  which would move router weights, and so the output, by the last bit as the batch changes.
- GGUFSparseMoE replaces the layer, to run the routing and the gate's sigmoid as opaque ops as well.

Every such computation is an opaque torch op (torch.library.custom_op): the compiled CPU decode step holds their
data-dependent loops whole and runs the same eager code a prefill runs.
"""
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels import Backend
from kernels.cpu_quant import pack_q4_1, pack_q8_0
from kernels.moe import combine, route, sort_by_expert
from models.moe import SparseMoE

if TYPE_CHECKING:  # models.gguf_loader imports the gguf package, which a model directory never needs
    from models.gguf_loader import QuantizedWeight

_CHUNK_ELEMENTS = 1 << 22  # products held at once by invariant_linear (16 MiB of float32)


@torch.library.custom_op("tokenmill::invariant_linear", mutates_args=())
def invariant_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T in float32, each output as the sum of its K products in one fixed order (torch's
    inner-dimension sum), so a row's result does not depend on the other rows. Elementwise products in chunks of
    rows: for the small matrices it is meant for (routers: N = experts)."""
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // max(1, weight.numel()))
    out = [(rows[i:i + step, None, :] * weight).sum(-1) for i in range(0, rows.shape[0], step)]
    result = torch.cat(out) if out else rows.new_empty(0, weight.shape[0])
    return result.reshape(*x.shape[:-1], weight.shape[0])


@invariant_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class InvariantLinear(nn.Linear):
    """A float32 Linear whose every output row is bit-identical whatever other rows share the call. A subclass, so
    use_cpu_linears (which swaps plain nn.Linear only) leaves it be."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = invariant_linear(x, self.weight)
        return out if self.bias is None else out + self.bias

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "InvariantLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new


@torch.library.custom_op("tokenmill::invariant_route", mutates_args=())
def invariant_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.moe.route as an opaque op: the compiled decode step would otherwise generate its own softmax, whose
    exp rounds unlike eager torch's, and a token would be routed by other weights when decoded than when prefilled
    (or recomputed after preemption)."""
    weights, ids = route(router_logits, top_k, renormalize)
    return weights.contiguous(), ids.contiguous()


@invariant_route.register_fake
def _(router_logits, top_k, renormalize):
    shape = (*router_logits.shape[:-1], top_k)
    return router_logits.new_empty(shape, dtype=torch.float32), router_logits.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("tokenmill::invariant_sigmoid", mutates_args=())
def invariant_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """torch.sigmoid of a [T, 1] column (Qwen2-MoE's shared-expert gate), the same for a row wherever it sits. On a
    contiguous column torch runs its vector loop over the first rows and its scalar loop (another exp) over the last
    few; over a strided view every row takes the scalar loop. An opaque op for the reason invariant_route is."""
    return torch.sigmoid(x.repeat(1, 2)[:, :1]).contiguous()


@invariant_sigmoid.register_fake
def _(x):
    return x.new_empty(x.shape)


_LINEARS = {"q4_1": lambda: torch.ops.tokenmill.q4_1_linear, "q8_0": lambda: torch.ops.tokenmill.q8_0_linear}


@torch.library.custom_op("tokenmill::gguf_experts", mutates_args=())
def gguf_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, qs13: torch.Tensor,
                 scales13: torch.Tensor, n13: int, kind13: str, qs2: torch.Tensor, scales2: torch.Tensor, n2: int,
                 kind2: str) -> torch.Tensor:
    """kernels.moe.fused_moe over packed blocks: qs13 / scales13 [E, ...] each expert's gate rows then up rows
    (n13 = 2 * I of them), qs2 / scales2 its down projection (n2 = H rows)."""
    tokens, top_k = topk_ids.shape
    if tokens == 0:
        return x.new_zeros(x.shape)
    order, counts = sort_by_expert(topk_ids, qs13.shape[0])
    rows = x[order // top_k]
    gate_up, down = _LINEARS[kind13](), _LINEARS[kind2]()
    outs = []
    start = 0
    for expert, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        h = torch.ops.tokenmill.silu_and_mul(gate_up(rows[start:start + n], qs13[expert], scales13[expert], n13, None))
        outs.append(down(h, qs2[expert], scales2[expert], n2, None))
        start += n
    pair_out = torch.cat(outs)[torch.argsort(order)]  # back to token-major order
    return combine(pair_out, topk_weights, topk_ids).contiguous()


@gguf_experts.register_fake
def _(x, topk_weights, topk_ids, qs13, scales13, n13, kind13, qs2, scales2, n2, kind2):
    return x.new_empty(x.shape)


def _stacked(weight: "QuantizedWeight", name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A QuantizedWeight [E, rows, cols] packed expert by expert as the kernels read it: (qs, scales) [E, ...]."""
    if weight.q.dim() != 3:
        raise ValueError(f"GGUF experts {name} must be stacked [experts, rows, cols], got {list(weight.q.shape)}")
    packs = [pack_q4_1(weight.q[e], weight.d[e], weight.m[e]) if weight.kind == "q4_1" else
             pack_q8_0(weight.q[e], weight.d[e]) for e in range(weight.q.shape[0])]
    return torch.stack([p.qs for p in packs]), torch.stack([p.scales for p in packs]), packs[0].n


def _quantized(quantized: dict, name: str) -> "QuantizedWeight":
    if name not in quantized:
        raise ValueError(f"quantization='gguf' computes with Q4_1 and Q8_0 tensors only; the file stores {name} "
                         "(by its Hugging Face name) as another type")
    return quantized[name]


def _gate_up(quantized: dict, prefix: str) -> "QuantizedWeight":
    """The file's gate and up experts as one [E, 2 * I, H] weight (or its joined ffn_gate_up_exps as it is)."""
    if f"{prefix}.gate_up_proj" in quantized:
        return quantized[f"{prefix}.gate_up_proj"]
    gate, up = _quantized(quantized, f"{prefix}.gate_proj"), _quantized(quantized, f"{prefix}.up_proj")
    if gate.kind != up.kind:
        raise ValueError(f"quantization='gguf': {prefix}.gate_proj is {gate.kind} but {prefix}.up_proj is {up.kind}; "
                         "the experts' gate and up rows run as one projection")
    return type(gate)(gate.kind, *(None if a is None else torch.cat([a, b], 1)
                                   for a, b in ((gate.q, up.q), (gate.d, up.d), (gate.m, up.m))))


class GGUFExperts(nn.Module):
    """SparseMoE.experts computed from a GGUF file's Q4_1 / Q8_0 blocks (see the module docstring)."""

    def __init__(self, gate_up: "QuantizedWeight", down: "QuantizedWeight"):
        super().__init__()
        qs13, scales13, self.n13 = _stacked(gate_up, "gate_up_proj")
        qs2, scales2, self.n2 = _stacked(down, "down_proj")
        self.kind13, self.kind2 = gate_up.kind, down.kind
        for name, tensor in (("qs13", qs13), ("scales13", scales13), ("qs2", qs2), ("scales2", scales2)):
            self.register_buffer(name, tensor, persistent=False)

    @classmethod
    def from_gguf(cls, prefix: str, quantized: dict) -> "GGUFExperts":
        """From models.gguf_loader.gguf_quantized's tensors under `prefix` (model.layers.N.mlp.experts)."""
        return cls(_gate_up(quantized, prefix), _quantized(quantized, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                ops: Backend) -> torch.Tensor:
        # `ops` is not needed: these blocks run on tokenmill's CPU ops whichever backend runs the rest
        return gguf_experts(x, topk_weights, topk_ids, self.qs13, self.scales13, self.n13, self.kind13, self.qs2,
                            self.scales2, self.n2, self.kind2)

    def extra_repr(self) -> str:
        return f"experts={self.qs13.shape[0]}, gate_up={self.kind13} x {self.n13}, down={self.kind2} x {self.n2}"


class GGUFSparseMoE(SparseMoE):
    """SparseMoE on the gguf path: the router and the shared expert's gate keep their float32 weights in row-invariant
    products (InvariantLinear), the routing and the gate's sigmoid run as opaque ops, and the experts are
    GGUFExperts; what the compiled step still computes itself (the weighted sum with the shared expert) is exact
    elementwise arithmetic. So a token's output is one computation, whatever the batch and whichever step runs it.
    Serving only: it does not collect router_logits for training's load-balancing loss."""

    def forward(self, x: torch.Tensor, ops: Backend) -> torch.Tensor:
        weights, ids = invariant_route(self.gate(x), self.top_k, self.renormalize)
        self.count_load(ids)
        out = self.experts(x, weights, ids, ops)
        if self.shared_expert is not None:
            out = out + invariant_sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, ops)
        return out
