"""The decoder-only Transformer of the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

One implementation, switched by ModelConfig: GQA attention with RoPE over a paged KV cache, RMSNorm, SwiGLU,
optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3), tied or untied embeddings. It runs on a flat batch:
the new tokens of every sequence in one [num_tokens] tensor, as the model runner builds it.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels import TORCH, AttentionMetadata, Backend
from models import moe
from models.config import ModelConfig


@dataclass
class CausalBatch:
    """Training and scoring: `batch` sequences of `length` tokens each, laid out flat like the serving batch, with
    plain causal attention and no KV cache (the same layers, so training and serving share one definition)."""
    batch: int
    length: int
    backend: Backend = field(default=TORCH)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: Backend, residual: torch.Tensor | None = None):
        """With `residual`: (norm(x + residual), x + residual), the fused form of a pre-norm layer's add."""
        # the torch path is one fused op that accumulates in float32: bit-identical to transformers' formula in
        # float32, and in bf16 it rounds once where transformers rounds twice
        return ops.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once; HF's rotate-half layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(cfg))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, head_dim / 2] for these positions, looked up once for all layers."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_cache = self.v_cache = torch.empty(0)  # set by the model runner

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        ops = meta.backend
        if self.q_norm is not None:
            q, k = self.q_norm(q, ops), self.k_norm(k, ops)
        q, k = ops.rotary(q, k, *rope)
        if isinstance(meta, CausalBatch):
            return self.o_proj(self._causal(q, k, v, meta).reshape(n, self.q_size))
        ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_prefill:
            o = ops.prefill_attention(q, k, v, meta.cu_seqlens_q, self.k_cache, self.v_cache, meta.block_tables,
                                      meta.context_lens, self.scale, meta.max_seqlen_q)
        else:
            o = ops.decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                     self.scale)
        return self.o_proj(o.reshape(n, self.q_size))


    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: CausalBatch) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:  # [B * T, h, d] -> [B, h, T, d]
            return x.view(meta.batch, meta.length, -1, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ops: Backend) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(index):
            shared = MLP(cfg, cfg.shared_expert_intermediate_size) if cfg.shared_expert_intermediate_size else None
            self.mlp = moe.SparseMoE(cfg, shared)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope, meta: AttentionMetadata):
        """x is the last sublayer's output, residual the stream before it (None in the first layer)."""
        ops = meta.backend
        if residual is None:
            x, residual = self.input_layernorm(x, ops), x
        else:
            x, residual = self.input_layernorm(x, ops, residual)
        x = self.self_attn(x, rope, meta)
        x, residual = self.post_attention_layernorm(x, ops, residual)
        return self.mlp(x, ops), residual


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names of the projections we store fused: (fused name, shard index)
    packed = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rope(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, meta)
        return self.norm(x, meta.backend, residual)[0]

    def head_module(self) -> nn.Linear:
        """The output head as a module, for transforms that replace Linears (int8, CPULinear): a tied model gets
        an nn.Linear over the embedding's weight, built on meta so nothing is allocated."""
        if self.lm_head is None:
            cfg = self.config
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
            self.lm_head.weight = self.embed_tokens.weight
        return self.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def causal_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] for a batch of whole sequences [B, T] (training, scoring)."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).repeat(batch)
        hidden = self(input_ids.reshape(-1), positions, CausalBatch(batch, length))
        return self.compute_logits(hidden).view(batch, length, -1)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers' names, fused projections split again (what load_weights reads)."""
        split = {fused: [name for name, (f, _) in sorted(self.packed.items(), key=lambda kv: kv[1][1]) if f == fused]
                 for fused, _ in self.packed.values()}
        cfg = self.config
        sizes = {"qkv_proj": [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            parts = name.split(".")
            hf = "model." + name if not name.startswith("lm_head") else name
            if len(parts) >= 2 and parts[-2] == "experts":
                out.update(moe.expert_weights(hf.rsplit(".", 1)[0], parts[-1], tensor, cfg.architecture))
            elif ".mlp.gate." in name:
                out[moe.hf_name(hf, cfg.architecture)] = tensor.contiguous()
            elif len(parts) >= 2 and parts[-2] in split:
                chunks = tensor.split(sizes[parts[-2]], dim=0) if parts[-2] in sizes else tensor.chunk(2, dim=0)
                for piece, chunk in zip(split[parts[-2]], chunks):
                    out[hf.replace(parts[-2], piece)] = chunk.contiguous()
            else:
                out[hf] = tensor.contiguous()
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face state dict (names as in transformers' LlamaForCausalLM and kin)."""
        params = dict(self.named_parameters())
        shards: dict[str, list[torch.Tensor | None]] = {}
        experts: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        loaded: set[str] = set()
        for name, tensor in weights.items():
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store a copy anyway
            if (key := moe.expert_key(name)) is not None:
                experts.setdefault(key[0], {})[key[1:]] = tensor
                continue
            name = moe.from_hf_name(name)
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in self.packed:
                fused, idx = self.packed[parts[-2]]
                key = ".".join(parts[:-2] + [fused, parts[-1]])
                shards.setdefault(key, [None, None, None] if fused == "qkv_proj" else [None, None])[idx] = tensor
                continue
            self._copy(params, name, tensor)
            loaded.add(name)
        for key, pieces in shards.items():
            if any(p is None for p in pieces):
                raise ValueError(f"checkpoint lacks part of {key} (has {sum(p is not None for p in pieces)} of "
                                 f"{len(pieces)} projections)")
            self._copy(params, key, torch.cat(pieces, dim=0))
            loaded.add(key)
        for key, pieces in experts.items():
            self._copy(params, key, self._stack_experts(key, pieces, params))
            loaded.add(key)
        for layer in moe.moe_layers(self):
            layer.expert_load.zero_()  # a buffer, not in checkpoints: built on meta, it holds garbage until now
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights: {', '.join(missing[:5])}"
                             f"{' …' if len(missing) > 5 else ''}")

    @staticmethod
    def _stack_experts(key: str, pieces: dict[tuple[int, int], torch.Tensor],
                       params: dict[str, nn.Parameter]) -> torch.Tensor:
        """One matrix per (expert, half) -> the stacked [E, rows, cols] parameter `key`."""
        if (-1, 0) in pieces:  # already stacked by the checkpoint
            return pieces[(-1, 0)]
        if key not in params:
            raise ValueError(f"checkpoint has expert weights for {key!r}, which this config does not have")
        num_experts, halves = params[key].shape[0], 2 if key.endswith("w13") else 1
        absent = [f"expert {e}" for e in range(num_experts) for h in range(halves) if (e, h) not in pieces]
        if absent or len(pieces) != num_experts * halves:
            raise ValueError(f"checkpoint's experts for {key} do not match num_experts={num_experts}: "
                             f"{'lacks ' + ', '.join(dict.fromkeys(absent)) if absent else 'has more experts'}")
        return torch.stack([torch.cat([pieces[(e, h)] for h in range(halves)]) for e in range(num_experts)])

    @staticmethod
    def _copy(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            raise ValueError(f"checkpoint has unexpected weight {name!r}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"the config expects {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor)
