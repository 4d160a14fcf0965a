"""Opt-in weight quantization for CPU serving (`quantization=...`), for latency rather than bit-exact output.

"int4": every projection of the decoder layers keeps 4-bit weights in groups of 32 inputs, each group with its own
scale and minimum (w = scale * q + min, q in 0..15: the GGUF Q4_1 scheme, so a Q4_1 GGUF such as the default
model re-quantizes without any loss). Steps of up to INT4_MAX_ROWS rows (decode batches) run torch's int4 CPU
kernel, which reads an eighth of the float32 weight bytes; its activations are bfloat16 (its float32 path is not
vectorized). Larger steps (prefill chunks, big batches) multiply the dequantized float32 weights, which are kept
as well, because there the int4 kernel is slower than float32 GEMM. On SmolLM2-135M-Instruct the int4 path agrees
with float32 on 98-99% of next tokens (full bfloat16: 95-97%).

"int8": the output head, a fifth of a small model's compute and most of a single-stream decode step's memory
traffic (49152 x 576 floats for SmolLM2), becomes a dynamically quantized Linear: weights int8 per output channel,
activations quantized at run time, the matmul in fbgemm's int8 kernels (+10-25% single-stream tok/s on AVX2,
nothing offline: benchmarks/results/offline_quant_cpu.md). Only the head: fbgemm takes one activation scale per
tensor, and the inputs of the attention and MLP projections carry outlier channels that such a scale cannot hold
(quantizing them took SmolLM2's top-1 agreement with float32 to 0.50-0.77 on a test sentence). The head alone
keeps 1.00 on that sentence but only 0.81 on the 60-token paragraph of tests/test_quantize.py (int4: 0.98).

Neither is invariant: which path a sequence's rows take depends on the step's batch ("int4"), or the activation
scale spans it ("int8"), so a sequence's logits can depend on what else is in the batch.

"gguf": a GGUF file's own Q4_1 and Q8_0 matrices, computed as stored by kernels/cpu_ops.py (C++, AVX2), the way
llama.cpp computes them: activations quantized to int8 per row and group of 32, integer dot products, float32
accumulation in a fixed order. No weight is re-quantized, and every output row is bit-identical whatever else shares
the step, so this path is batch-invariant. Mixture-of-Experts layers keep it so (models/gguf_experts.py)."""
import torch
from torch import nn

from models.cpu_linear import CPULinear, replace_linears
from models.config import ModelConfig
from models.gguf_experts import GGUFExperts, GGUFSparseMoE, InvariantLinear
from models.llama import LlamaForCausalLM
from models.moe import SparseMoE

QUANTIZATIONS = ("int8", "int4", "gguf")
INT4_GROUP = 32
INT4_MAX_ROWS = 12  # measured crossover with float32 GEMM on 2 AVX2 cores (benchmarks/results/cpu_linear.md)


def _check_cpu(name: str, device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"quantization={name!r} runs on CPU only; on CUDA use bfloat16")


class Int4Linear(CPULinear):
    """A float32 Linear that also holds its weights as packed int4 groups (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] > INT4_MAX_ROWS:
            return super().forward(x)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, INT4_GROUP,
                                                         self.scales_zeros).float()
        return out if self.bias is None else out + self.bias

    @classmethod
    def quantizing(cls, linear: nn.Linear) -> "Int4Linear":
        """Quantize linear's weight (in_features a multiple of INT4_GROUP, out_features of 16); the float32 weight
        becomes the dequantized one, so both paths compute with the same weights."""
        w = linear.weight.detach().float()
        rows, cols = w.shape
        groups = w.view(rows, cols // INT4_GROUP, INT4_GROUP)
        low = groups.amin(-1)
        scale = ((groups.amax(-1) - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        new = cls.sharing(linear)
        new.weight = nn.Parameter((q * scale[..., None] + low[..., None]).view(rows, cols), requires_grad=False)
        # the kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale; layout [groups, out, 2]
        zeros = low + 8 * scale
        new.register_buffer("scales_zeros", torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()
                            .to(torch.bfloat16), persistent=False)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(rows, cols).to(torch.int32), 1)
        new.register_buffer("packed", packed, persistent=False)
        return new


def quantize_int4(model: LlamaForCausalLM, device: torch.device) -> LlamaForCausalLM:
    """Mixture-of-Experts layers keep their routers float32 (a few outputs that pick the experts) and their stacked
    experts too: int4 covers the Linear projections only."""
    _check_cpu("int4", device)
    routers = frozenset(id(m) for moe in model.layers.modules() if isinstance(moe, SparseMoE)
                        for m in (moe.gate, moe.shared_expert_gate) if m is not None)
    for linear in model.layers.modules():
        if type(linear) is nn.Linear and id(linear) not in routers and (
                linear.in_features % INT4_GROUP or linear.out_features % 16):  # tiles
            raise ValueError(f"quantization='int4' needs input sizes that are multiples of {INT4_GROUP} and output "
                             f"sizes that are multiples of 16; a projection is {linear.in_features} -> "
                             f"{linear.out_features}")
    replace_linears(model.layers, Int4Linear.quantizing, routers)
    return model


def quantize_int8(model: LlamaForCausalLM, device: torch.device) -> LlamaForCausalLM:
    _check_cpu("int8", device)
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("quantization='int8' needs torch's fbgemm engine, which this build lacks")
    model.head_module()  # a tied head becomes a module quantize_dynamic can replace
    torch.backends.quantized.engine = "fbgemm"
    spec = {"lm_head": torch.ao.quantization.per_channel_dynamic_qconfig}
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


class GGUFLinear(nn.Module):
    """A projection computed from packed GGUF Q4_1 or Q8_0 weights (kernels/cpu_ops.py); float32 in and out."""

    def __init__(self, kind: str, packed, bias: torch.Tensor | None):
        super().__init__()
        from kernels import cpu_ops
        ops = cpu_ops.load()  # builds the extension on first use and registers the ops' shapes for torch.compile
        self.kind = kind
        self.op = ops.q4_1_linear if kind == "q4_1" else ops.q8_0_linear
        self.register_buffer("qs", packed.qs, persistent=False)
        self.register_buffer("scales", packed.scales, persistent=False)
        self.out_features = packed.n
        self.in_features = packed.qs.shape[1] * 32
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.qs, self.scales, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}"


def _gguf_linear(linear: nn.Linear, names: list[str], quantized: dict) -> GGUFLinear:
    """One GGUFLinear from the GGUF tensors fused into `linear` (q, k, v or gate, up: rows one after another)."""
    from kernels import cpu_quant
    parts = [quantized.get(name) for name in names]
    missing = [name for name, part in zip(names, parts) if part is None]
    if missing:
        raise ValueError(f"quantization='gguf' computes with Q4_1 and Q8_0 tensors only; the file stores {missing[0]} "
                         "(by its Hugging Face name) as another type")
    kinds = {part.kind for part in parts}
    if len(kinds) > 1:
        raise ValueError(f"quantization='gguf': the tensors fused into one projection ({', '.join(names)}) mix "
                         f"{' and '.join(sorted(kinds))}")
    q = torch.cat([part.q for part in parts])
    d = torch.cat([part.d for part in parts])
    packed = cpu_quant.pack_q4_1(q, d, torch.cat([part.m for part in parts])) if parts[0].kind == "q4_1" \
        else cpu_quant.pack_q8_0(q, d)
    return GGUFLinear(parts[0].kind, packed, linear.bias)


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _quantize_projections(parent: nn.Module, prefix: str, quantized: dict) -> None:
    """Every nn.Linear child of `parent` (an attention block or a dense MLP, named `prefix` in the file) becomes a
    GGUFLinear."""
    for name, child in list(parent.named_children()):
        if isinstance(child, nn.Linear):
            names = [f"{prefix}.{piece}.weight" for piece in _FUSED.get(name, (name,))]
            setattr(parent, name, _gguf_linear(child, names, quantized))


def _quantize_moe(moe: SparseMoE, cfg: ModelConfig, prefix: str, quantized: dict) -> GGUFSparseMoE:
    """The layer with its experts (and Qwen2-MoE's shared expert) computing with the file's blocks; the router and
    the shared expert's gate keep their float32 weights, whatever type the file stores them in (llama.cpp writes
    F32), in row-invariant products (models/gguf_experts.py)."""
    with torch.device("meta"):  # its own router and experts are replaced below: nothing to allocate
        new = GGUFSparseMoE(cfg)
    new.expert_load = moe.expert_load  # a real buffer, unlike the one built on meta
    new.gate = InvariantLinear.sharing(moe.gate)
    new.experts = GGUFExperts.from_gguf(f"{prefix}.experts", quantized)
    if moe.shared_expert is not None:
        _quantize_projections(moe.shared_expert, f"{prefix}.shared_expert", quantized)
        new.shared_expert = moe.shared_expert
        new.shared_expert_gate = InvariantLinear.sharing(moe.shared_expert_gate)
    return new


def quantize_gguf(model: LlamaForCausalLM, quantized: dict, device: torch.device) -> LlamaForCausalLM:
    """Swap every decoder projection (and the output head, when the file stores it as Q4_1 or Q8_0) for a
    GGUFLinear over the file's own blocks (`quantized`: models.gguf_loader.gguf_quantized), and every
    Mixture-of-Experts layer for a GGUFSparseMoE whose experts compute with them."""
    _check_cpu("gguf", device)
    from kernels import cpu_ops
    if reason := cpu_ops.missing():
        raise ValueError(f"quantization='gguf' needs tokenmill's CPU kernels: {reason}")
    cpu_ops.load()
    for i, layer in enumerate(model.layers):
        _quantize_projections(layer.self_attn, f"model.layers.{i}.self_attn", quantized)
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp = _quantize_moe(layer.mlp, model.config, f"model.layers.{i}.mlp", quantized)
        else:
            _quantize_projections(layer.mlp, f"model.layers.{i}.mlp", quantized)
    head = "lm_head.weight" if model.lm_head is not None else "model.embed_tokens.weight"
    if head in quantized:
        model.lm_head = _gguf_linear(model.head_module(), [head], quantized)
    return model
