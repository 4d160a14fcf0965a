"""Float32 linear layers for CPU decode steps: the same weights, multiplied in the other operand order.

`F.linear(x, W)` with few rows in x (a decode step's batch) runs far below the machine's memory bandwidth in
torch's CPU GEMM: measured on 2 AVX2 cores (torch 2.13, MKL), SmolLM2-135M's 120 projections took 100 ms at 2
rows where `(W @ x.T).T` took 41 ms, 1.3-1.5x less at 8-96 rows, and from 128 rows on F.linear is as fast
(benchmarks/results/cpu_linear.md). So rows up to MAX_ROWS take the transposed product (one row as two: the
two-column product also beats the one-column GEMV path) and larger batches (prefill chunks) keep F.linear.
bfloat16 gained nothing (its GEMM is oneDNN's), so this is for float32 only.

The result is a transposed view: views that split its last dim, slices and elementwise ops take it as it is.
Values match F.linear to float32 rounding (GEMM kernels already round differently at different row counts).
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.llama import LlamaForCausalLM

MAX_ROWS = 96


class CPULinear(nn.Linear):
    contiguous: bool = False  # the output head's result is copied to rows: the sampler reads it along rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() != 2 or rows > MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        if rows == 1:  # a two-column product streams the weights faster than the one-column (GEMV) path
            x = x.expand(2, -1).contiguous()
        if self.bias is None:
            out = torch.mm(self.weight, x.t())
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, x.t())
        out = out.t()[:rows]
        return out.contiguous() if self.contiguous else out

    @classmethod
    def sharing(cls, linear: nn.Linear) -> "CPULinear":
        """A CPULinear over the same parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new


def replace_linears(root: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: frozenset[int] = frozenset()) -> int:
    """Replace every plain nn.Linear under root (subclasses, and those whose id() is in skip, stay) with
    make(linear); returns how many."""
    replaced = 0
    for module in list(root.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear and id(child) not in skip:
                setattr(module, name, make(child))
                replaced += 1
    return replaced


def use_cpu_linears(model: LlamaForCausalLM) -> int:
    """Swap every nn.Linear of a float32 CPU model (and the tied output head) for a CPULinear; returns how many."""
    model.head_module()
    swapped = replace_linears(model, CPULinear.sharing)
    if isinstance(model.lm_head, CPULinear):
        model.lm_head.contiguous = True
    return swapped
