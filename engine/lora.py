"""Many LoRA adapters served in one batch: each adaptable module of the model (qkv_proj, o_proj, gate_up_proj,
down_proj) is wrapped so that it adds, to the base projection, each token's own adapter delta
(kernels/lora.py: a segmented product over the adapters present; the Triton kernel on CUDA). Adapters live in
`max_loras` slots of stacked A/B tensors (slot 0: none, the base model); the runner sets every step's per-token
slots before the forward. An adapter not used by a running request is evicted, least recently used first, when a
new one needs its slot."""
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from kernels.lora import lora_delta, segments
from models.lora_adapter import LoRAAdapter, load_adapter, module_shapes


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's name and fields: which adapter a request runs with."""
    lora_name: str
    lora_int_id: int
    lora_path: str


class _Tokens:
    """The step's adapter slot per token and its segments, shared by every wrapped module (None: no adapter)."""
    slots: torch.Tensor | None = None
    plan: list | None = None


class LoRASlots(nn.Module):
    def __init__(self, base: nn.Module, size_out: int, size_in: int, rank: int, num_slots: int, tokens: _Tokens,
                 device: torch.device):
        super().__init__()
        self.base, self.tokens = base, tokens
        self.register_buffer("a", torch.zeros(num_slots, rank, size_in, device=device), persistent=False)
        self.register_buffer("b", torch.zeros(num_slots, size_out, rank, device=device), persistent=False)
        self.register_buffer("scales", torch.zeros(num_slots, device=device), persistent=False)
        self.ranks = [0] * num_slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.tokens.slots is None:
            return out
        delta = lora_delta(x.reshape(-1, x.shape[-1]).float(), self.tokens.slots, self.a, self.b, self.scales,
                           self.tokens.plan, self.ranks)
        return out + delta.reshape(out.shape).to(out.dtype)


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, device: torch.device):
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras ({max_loras}) and max_lora_rank ({max_lora_rank}) must be >= 1")
        self.model, self.max_loras, self.max_rank, self.device = model, max_loras, max_lora_rank, device
        self.tokens = _Tokens()
        self.loaded: OrderedDict[str, tuple[int, LoRAAdapter]] = OrderedDict()  # least recently used first
        self.wrappers: dict[str, LoRASlots] = {}
        modules = dict(model.named_modules())
        for key, (size_out, size_in) in module_shapes(model).items():
            parent, _, attr = key.rpartition(".")
            parts = 3 if attr == "qkv_proj" else 2 if attr == "gate_up_proj" else 1  # a PEFT adapter's fused rank
            wrapper = LoRASlots(getattr(modules[parent], attr), size_out, size_in, parts * max_lora_rank,
                                max_loras + 1, self.tokens, device)
            setattr(modules[parent], attr, wrapper)
            self.wrappers[key] = wrapper

    def slot(self, request: LoRARequest, in_use: set[str]) -> int:
        """The slot of the request's adapter, loading it (evicting one no running request uses) if needed."""
        if request.lora_name in self.loaded:
            self.loaded.move_to_end(request.lora_name)
            return self.loaded[request.lora_name][0]
        return self.add(load_adapter(request.lora_name, request.lora_path, self.model, self.max_rank), in_use)

    def add(self, adapter: LoRAAdapter, in_use: set[str] = frozenset()) -> int:
        taken = {slot for slot, _ in self.loaded.values()}
        free = [s for s in range(1, self.max_loras + 1) if s not in taken]
        if not free:
            idle = [name for name in self.loaded if name not in in_use]
            if not idle:
                raise ValueError(f"all {self.max_loras} adapter slots (max_loras) are used by running requests")
            free = [self.loaded.pop(idle[0])[0]]
        slot = free[0]
        for key, wrapper in self.wrappers.items():
            a, b = adapter.modules.get(key, (None, None))
            wrapper.a[slot].zero_()
            wrapper.b[slot].zero_()
            wrapper.ranks[slot] = 0 if a is None else a.shape[0]
            if a is not None:
                wrapper.a[slot, :a.shape[0]] = a
                wrapper.b[slot, :, :a.shape[0]] = b
            wrapper.scales[slot] = adapter.scale
        self.loaded[adapter.name] = (slot, adapter)
        return slot

    def set_tokens(self, slots: list[int]) -> None:
        """The slot of every token of the next forward (all 0: the base model, no LoRA work at all)."""
        self.tokens.slots = torch.tensor(slots, device=self.device) if any(slots) else None
        self.tokens.plan = None if self.tokens.slots is None else segments(self.tokens.slots)
