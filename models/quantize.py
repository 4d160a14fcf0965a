"""Opt-in int8 output head for CPU serving (`quantization="int8"`): the vocabulary projection, a fifth of a small
model's compute and most of a single-stream decode step's memory traffic (49152 x 576 floats for SmolLM2), becomes
a dynamically quantized Linear: weights int8 per output channel, activations quantized at run time, the matmul
in fbgemm's int8 kernels (2-7x faster than float32 on AVX2; benchmarks/results/offline_int8_cpu.md).

Only the head: fbgemm takes one activation scale per tensor, and the inputs of the attention and MLP projections
carry outlier channels that such a scale cannot hold (quantizing them took SmolLM2's top-1 agreement with float32
to 0.50-0.77 on a test sentence; the head alone keeps 1.00). Not the default either, because that per-tensor
scale spans the step's whole batch, so a sequence's logits can depend on what else is in the batch, which the
float32 path guarantees they never do."""
import torch

from models.llama import LlamaForCausalLM

QUANTIZATIONS = ("int8",)


def quantize_int8(model: LlamaForCausalLM, device: torch.device) -> LlamaForCausalLM:
    if device.type != "cpu":
        raise ValueError("quantization='int8' runs on CPU only (fbgemm); on CUDA use bfloat16")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("quantization='int8' needs torch's fbgemm engine, which this build lacks")
    model.head_module()  # a tied head becomes a module quantize_dynamic can replace
    torch.backends.quantized.engine = "fbgemm"
    spec = {"lm_head": torch.ao.quantization.per_channel_dynamic_qconfig}
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
