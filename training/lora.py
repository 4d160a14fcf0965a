"""LoRA: W' = W + (alpha / r) * B A on chosen linear layers, the base weights frozen. Adapters are saved on their
own (adapter_model.safetensors + adapter_config.json) and can be merged into a full checkpoint: `tokenmill train
lora base=DIR adapter=DIR out_dir=DIR` merges a saved adapter; sft and dpo merge theirs with merge_lora=true.

In a Mixture-of-Experts model LoRA leaves the experts alone (they are stacked tensors, not linear layers): the
dense-MLP targets apply where dense MLPs (or Qwen2-MoE's shared expert) exist, and a model without any (Mixtral)
adapts attention only unless the router ("gate") is named."""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.loading import load_model
from models.moe import moe_layers
from training.checkpoint import save_pretrained

DEFAULT_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
MLP_TARGETS = ("gate_up_proj", "down_proj")  # a dense MLP's: absent from an MoE whose every layer has experts


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: training starts at W exactly
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> int:
    """Freeze `model` and wrap every linear layer whose attribute name is in `targets`; returns the number of
    trainable parameters."""
    model.requires_grad_(False)
    linears = sorted({name for module in model.modules() for name, child in module.named_children()
                      if isinstance(child, nn.Linear)})
    found = set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
                found.add(name)
    missing = sorted(set(targets) - found)
    if moe_layers(model):  # the dense-MLP names may have nothing to adapt: the experts are not linear layers
        missing = [name for name in missing if name not in MLP_TARGETS]
    if missing or not found:
        raise ValueError(f"lora_targets {missing or sorted(targets)} name no linear layer of the model "
                         f"(it has {', '.join(linears)})")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())


def save_adapter(model: nn.Module, out: Path, rank: int, alpha: float, targets: list[str], base: str) -> None:
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    save_file(weights, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(
        {"base_model": base, "r": rank, "lora_alpha": alpha, "target_modules": targets}, indent=2) + "\n")


@dataclass
class MergeSettings:
    base: str = "out/pretrain"  # the model the adapter was trained on
    adapter: str = "out/sft"  # a directory with adapter_model.safetensors and adapter_config.json
    out_dir: str = "out/merged"


def merge_adapter(s: MergeSettings) -> Path:
    config_path = Path(s.adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{s.adapter} has no adapter_config.json: not a LoRA adapter directory")
    config = json.loads(config_path.read_text())
    loaded = load_model(s.base, "float32", "cpu")
    add_lora(loaded.model, config["r"], config["lora_alpha"], config["target_modules"])
    weights = load_file(Path(s.adapter) / "adapter_model.safetensors")
    missing, unexpected = loaded.model.load_state_dict(weights, strict=False)
    if unexpected or any("lora_" in name for name in missing):
        raise ValueError(f"{s.adapter}: the adapter does not fit {s.base} (unexpected: {unexpected[:3]})")
    merge_lora(loaded.model)
    return save_pretrained(loaded.model, loaded.path if loaded.path.is_dir() else loaded.tokenizer, s.out_dir)
