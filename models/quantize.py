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

Neither is the default: which path a sequence's rows take depends on the step's batch ("int4"), or the activation
scale spans it ("int8"), so a sequence's logits can depend on what else is in the batch, which the float32 path
guarantees they never do."""
import torch
from torch import nn

from models.cpu_linear import CPULinear, replace_linears
from models.llama import LlamaForCausalLM

QUANTIZATIONS = ("int8", "int4")
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
    _check_cpu("int4", device)
    for linear in model.layers.modules():
        if type(linear) is nn.Linear and (linear.in_features % INT4_GROUP or linear.out_features % 16):  # tiles
            raise ValueError(f"quantization='int4' needs input sizes that are multiples of {INT4_GROUP} and output "
                             f"sizes that are multiples of 16; a projection is {linear.in_features} -> "
                             f"{linear.out_features}")
    replace_linears(model.layers, Int4Linear.quantizing)
    return model


def quantize_int8(model: LlamaForCausalLM, device: torch.device) -> LlamaForCausalLM:
    _check_cpu("int8", device)
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("quantization='int8' needs torch's fbgemm engine, which this build lacks")
    model.head_module()  # a tied head becomes a module quantize_dynamic can replace
    torch.backends.quantized.engine = "fbgemm"
    spec = {"lm_head": torch.ao.quantization.per_channel_dynamic_qconfig}
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
