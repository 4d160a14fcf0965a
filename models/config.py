"""ModelConfig: the decoder's shape, read from a Hugging Face config.json (or GGUF metadata)."""
from dataclasses import dataclass, field
from typing import Any

# architectures -> the per-family switches of our one decoder implementation
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    # Mixture-of-Experts: every MLP (Mixtral) or every decoder_sparse_step-th one not in mlp_only_layers (Qwen) is
    # a router over experts; Qwen2-MoE adds a shared expert behind a sigmoid gate
    "MixtralForCausalLM": {"moe": "mixtral"},
    "Qwen2MoeForCausalLM": {"qkv_bias": True, "moe": "qwen"},
    "Qwen3MoeForCausalLM": {"qk_norm": True, "moe": "qwen"},
}
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                "Qwen3MoeForCausalLM": "qwen3_moe"}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    # Mixture-of-Experts (num_experts 0: a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0            # each expert's hidden width
    norm_topk_prob: bool = False               # rescale the top-k router weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.0          # training's load-balancing loss weight

    def __post_init__(self):
        if self.num_experts or _ARCHITECTURES.get(self.architecture, {}).get("moe"):
            check_moe(self)

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token in all layers, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def to_hf(self) -> dict[str, Any]:
        """config.json for this shape, as transformers writes it (what from_hf reads back)."""
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None)
        out = {"architectures": [self.architecture], "model_type": _MODEL_TYPES[self.architecture],
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
               "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
               "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
               "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
               "max_position_embeddings": self.max_position_embeddings,
               "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.qkv_bias,
               "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id, "eos_token_id": eos,
               "torch_dtype": self.torch_dtype or "float32"}
        moe = _ARCHITECTURES[self.architecture].get("moe")
        if moe == "mixtral":
            out.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       router_aux_loss_coef=self.router_aux_loss_coef, sliding_window=self.sliding_window)
        elif moe == "qwen":
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                       decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers),
                       router_aux_loss_coef=self.router_aux_loss_coef)
            if self.architecture == "Qwen2MoeForCausalLM":
                out["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return out

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in _ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"tokenmill supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = cfg["hidden_size"]
            heads = cfg["num_attention_heads"]
            rope = cfg.get("rope_parameters") or {}
            scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            if scaling is not None:
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                if kind not in _ROPE_TYPES:
                    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {_ROPE_TYPES})")
            eos = cfg.get("eos_token_id")
            family = _ARCHITECTURES[arch]
            bias = bool(cfg.get("attention_bias", False))
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"] if family.get("moe") != "qwen" else
                cfg.get("intermediate_size", 0),
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or hidden // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
                rope_scaling=scaling,
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                qkv_bias=family.get("qkv_bias", bias),
                o_bias=bias and arch != "Qwen2ForCausalLM",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=family.get("qk_norm", False),
                sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                **_moe_fields(cfg, family.get("moe"), arch),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None


def _moe_fields(cfg: dict[str, Any], kind: str | None, arch: str) -> dict[str, Any]:
    """The expert fields of a config.json, under Mixtral's or Qwen-MoE's names (KeyError: a required one is absent)."""
    if kind is None:
        return {}
    if kind == "mixtral":
        return dict(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True,
                    router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.0))
    experts = cfg["num_experts"] if "num_experts" in cfg or "num_local_experts" not in cfg else cfg["num_local_experts"]
    return dict(num_experts=experts, num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["moe_intermediate_size"], norm_topk_prob=cfg.get("norm_topk_prob", False),
                shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"]
                if arch == "Qwen2MoeForCausalLM" else 0,
                decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
                mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
                router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.0))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_moe(cfg: ModelConfig) -> None:
    """A ValueError naming the expert field that is missing or does not fit the others."""
    if not _ARCHITECTURES.get(cfg.architecture, {}).get("moe"):
        moe = [a for a, family in _ARCHITECTURES.items() if family.get("moe")]
        raise ValueError(f"num_experts is set but {cfg.architecture} is a dense architecture; experts need one of "
                         f"{', '.join(moe)}")
    if not _positive_int(cfg.num_experts):
        raise ValueError(f"num_experts must be a positive integer, got {cfg.num_experts!r}")
    if not _positive_int(cfg.num_experts_per_tok) or cfg.num_experts_per_tok > cfg.num_experts:
        raise ValueError(f"num_experts_per_tok must be an integer from 1 to num_experts ({cfg.num_experts}), "
                         f"got {cfg.num_experts_per_tok!r}")
    if not _positive_int(cfg.moe_intermediate_size):
        raise ValueError(f"moe_intermediate_size must be a positive integer, got {cfg.moe_intermediate_size!r}")
    if not _positive_int(cfg.decoder_sparse_step):
        raise ValueError(f"decoder_sparse_step must be a positive integer, got {cfg.decoder_sparse_step!r}")
    if cfg.architecture == "Qwen2MoeForCausalLM" and not _positive_int(cfg.shared_expert_intermediate_size):
        raise ValueError("shared_expert_intermediate_size must be a positive integer for Qwen2MoeForCausalLM, "
                         f"got {cfg.shared_expert_intermediate_size!r}")
    bad = [i for i in cfg.mlp_only_layers if not isinstance(i, int) or not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"mlp_only_layers names layers outside 0..{cfg.num_layers - 1}: {bad}")
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense and not _positive_int(cfg.intermediate_size):
        raise ValueError(f"intermediate_size must be a positive integer: layers {dense} are dense MLPs")
    if not isinstance(cfg.router_aux_loss_coef, (int, float)) or cfg.router_aux_loss_coef < 0:
        raise ValueError(f"router_aux_loss_coef must be a number >= 0, got {cfg.router_aux_loss_coef!r}")
