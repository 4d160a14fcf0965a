"""The Mixture-of-Experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks top_k of num_experts SwiGLU experts
per token; Qwen2-MoE adds a shared expert behind a sigmoid gate. The expert computation itself is the backend's
(`ops.fused_moe`: kernels/moe.py in torch, kernels/triton_moe.py on CUDA), over weights stacked per layer.

Checkpoints store one matrix per expert (transformers writes `mlp.experts.N.{gate,up,down}_proj`, Mixtral
`block_sparse_moe.experts.N.w1/w3/w2`); they are stacked into w13 [E, 2 * I, H] and w2 [E, H, I] as they load
(`expert_key`) and split again when a checkpoint is written (`expert_weights`).
"""
import re

import torch
from torch import nn

from kernels import Backend
from kernels.moe import route
from models.config import ModelConfig


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                ops: Backend) -> torch.Tensor:
        return ops.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared_expert is not None else None
        self.router_logits: list[torch.Tensor] | None = None  # training sets a list to collect them (aux loss)
        # (token, slot) pairs routed to each expert since start, for /metrics: one small add per step
        self.register_buffer("expert_load", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor, ops: Backend) -> torch.Tensor:
        logits = self.gate(x)
        if self.router_logits is not None:
            self.router_logits.append(logits)
        weights, ids = route(logits, self.top_k, self.renormalize)
        self.count_load(ids)
        out = self.experts(x, weights, ids, ops)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, ops)
        return out


    def count_load(self, topk_ids: torch.Tensor) -> None:
        flat = topk_ids.reshape(-1)
        self.expert_load.scatter_add_(0, flat, torch.ones_like(flat))


# checkpoint names of one expert's matrices -> (stacked parameter, which rows of it)
_PARTS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0),
          "w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}
_EXPERT = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")


def expert_key(name: str) -> tuple[str, int, int] | None:
    """For a checkpoint name (without "model."), where its matrix goes: (our stacked parameter's name, expert, half:
    0 gate or down, 1 up), expert -1 for transformers' own stacked layout (`experts.gate_up_proj`, already
    [E, 2 * I, H]); None for a name that is not an expert's."""
    if m := _EXPERT.match(name):
        if m.group(3) not in _PARTS:
            raise ValueError(f"checkpoint has unexpected expert weight {name!r}")
        param, half = _PARTS[m.group(3)]
        return f"{m.group(1)}.mlp.experts.{param}", int(m.group(2)), half
    if m := _FUSED.match(name):
        return f"{m.group(1)}.mlp.experts.{'w13' if m.group(2) == 'gate_up_proj' else 'w2'}", -1, 0
    return None


def hf_name(name: str, architecture: str) -> str:
    """Our name of a router or expert tensor -> the checkpoint's (Mixtral keeps them under block_sparse_moe)."""
    return name.replace(".mlp.", ".block_sparse_moe.") if architecture == "MixtralForCausalLM" else name


def from_hf_name(name: str) -> str:
    return name.replace(".block_sparse_moe.", ".mlp.")


def expert_weights(prefix: str, param: str, tensor: torch.Tensor, architecture: str) -> dict[str, torch.Tensor]:
    """A stacked expert parameter (`prefix` = model.layers.N.mlp.experts) as one matrix per expert, named as
    transformers writes them."""
    mixtral = architecture == "MixtralForCausalLM"
    prefix = hf_name(prefix, architecture)
    out = {}
    for e, matrix in enumerate(tensor):
        if param == "w13":
            gate, up = matrix.chunk(2, dim=0)
            out[f"{prefix}.{e}.{'w1' if mixtral else 'gate_proj'}.weight"] = gate.contiguous()
            out[f"{prefix}.{e}.{'w3' if mixtral else 'up_proj'}.weight"] = up.contiguous()
        else:
            out[f"{prefix}.{e}.{'w2' if mixtral else 'down_proj'}.weight"] = matrix.contiguous()
    return out


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]
