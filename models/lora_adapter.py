"""LoRA adapters for serving, read from the two formats in use and put in the model's fused layout:

- tokenmill's (`tokenmill train sft lora_rank=R ... merge_lora=false`, training/lora.py): adapter_config.json with
  r, lora_alpha, target_modules naming our fused modules (qkv_proj, o_proj, gate_up_proj, down_proj), and
  adapter_model.safetensors with `layers.N.<path>.lora_a` [r, in] / `lora_b` [out, r];
- PEFT's: adapter_config.json (r, lora_alpha, use_rslora, target_modules in Hugging Face names) and
  `base_model.model.model.layers.N.<path>.lora_A.weight` / `lora_B.weight` per HF module. The parts of a fused
  module (q, k, v; gate, up) become one low-rank pair: A stacked along the rank, B block-diagonal, so a missing
  part is a zero block.
Each module's delta is scale * B @ A, scale = lora_alpha / r (or / sqrt(r) with rsLoRA)."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.llama import LlamaForCausalLM

FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    rank: int
    scale: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "layers.N.self_attn.qkv_proj" -> (A [r', in], B [out, r'])


def load_adapter(name: str, path: str | Path, model: LlamaForCausalLM, max_rank: int) -> LoRAAdapter:
    """Read and check an adapter against the served model; ValueError / FileNotFoundError naming what is wrong."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"lora adapter {name!r}: {path} has no adapter_config.json")
    config = json.loads(config_file.read_text())
    rank, alpha = int(config.get("r", 0)), float(config.get("lora_alpha", config.get("r", 0)))
    if rank < 1:
        raise ValueError(f"lora adapter {name!r}: adapter_config.json has no rank r")
    if rank > max_rank:
        raise ValueError(f"lora adapter {name!r} has rank {rank}, above max_lora_rank ({max_rank})")
    files = [p for p in (path / "adapter_model.safetensors",) if p.is_file()]
    if not files:
        raise FileNotFoundError(f"lora adapter {name!r}: {path} has no adapter_model.safetensors")
    tensors = load_file(files[0])
    scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    peft = any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    modules = _from_peft(tensors, model) if peft else _from_ours(tensors)
    if not modules:
        raise ValueError(f"lora adapter {name!r}: no LoRA weights in {files[0]}")
    shapes = module_shapes(model)
    for key, (a, b) in modules.items():
        if key not in shapes:
            raise ValueError(f"lora adapter {name!r} adapts {key}, which the served model does not have: it was "
                             "trained on another base model")
        out_features, in_features = shapes[key]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise ValueError(f"lora adapter {name!r}: {key} is {b.shape[0]}x{a.shape[1]} in the adapter but "
                             f"{out_features}x{in_features} in the served model: it was trained on another base model")
    return LoRAAdapter(name, path, rank, scale, modules)


def module_shapes(model: LlamaForCausalLM) -> dict[str, tuple[int, int]]:
    """(out, in) of every module an adapter may adapt, from the config (the modules may be quantized)."""
    cfg, shapes = model.config, {}
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i, layer in enumerate(model.layers):
        shapes[f"layers.{i}.self_attn.qkv_proj"] = (q + 2 * kv, cfg.hidden_size)
        shapes[f"layers.{i}.self_attn.o_proj"] = (cfg.hidden_size, q)
        if hasattr(layer.mlp, "gate_up_proj"):  # a dense MLP (experts are not adapted)
            width = cfg.intermediate_size
            shapes[f"layers.{i}.mlp.gate_up_proj"] = (2 * width, cfg.hidden_size)
            shapes[f"layers.{i}.mlp.down_proj"] = (cfg.hidden_size, width)
    return shapes


def _from_ours(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = {}
    for key in tensors:
        if key.endswith(".lora_a"):
            module = key.removesuffix(".lora_a")
            modules[module] = (tensors[key].float(), tensors[f"{module}.lora_b"].float())
    return modules


def _from_peft(tensors: dict[str, torch.Tensor], model: LlamaForCausalLM) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        hf = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.").removeprefix("model.")
        prefix, _, leaf = hf.rpartition(".")
        fused, index = FUSED.get(leaf, (leaf, 0))
        a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
        parts.setdefault(f"{prefix}.{fused}", {})[index] = (a, b)
    cfg = model.config
    q, kv, width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    sizes = {"qkv_proj": [q, kv, kv], "gate_up_proj": [width, width]}
    modules = {}
    for module, found in parts.items():
        leaf = module.rpartition(".")[2]
        if leaf not in sizes:
            modules[module] = found[0]
            continue
        rows = sizes[leaf]
        size_in = next(iter(found.values()))[0].shape[1]
        ranks = [found[i][0].shape[0] if i in found else 0 for i in range(len(rows))]
        a = torch.zeros(sum(ranks), size_in)
        b = torch.zeros(sum(rows), sum(ranks))
        r0 = o0 = 0
        for i, (r, o) in enumerate(zip(ranks, rows)):
            if r:
                a[r0:r0 + r] = found[i][0]
                b[o0:o0 + o, r0:r0 + r] = found[i][1]
            r0, o0 = r0 + r, o0 + o
        modules[module] = (a, b)
    return modules
