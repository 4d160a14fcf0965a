"""Read a GGUF file: its config from the metadata, its tensors dequantised with the `gguf` package, and its Q4_1
and Q8_0 tensors as stored (for the kernels that compute with them, models/quantize.py).

Mixture-of-Experts files as llama.cpp writes them: Mixtral as general.architecture "llama" with `llama.expert_count`,
Qwen2-MoE as "qwen2moe", Qwen3-MoE as "qwen3moe"; each MoE block's router `ffn_gate_inp`, its experts stacked in 3-D
tensors `ffn_{gate,up,down}_exps` (torch order [E, I, H], down [E, H, I]), Qwen2-MoE's shared expert `ffn_*_shexp`
behind `ffn_gate_inp_shexp`. A block without `_exps` tensors is a dense MLP (Qwen's mlp_only_layers)."""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

# GGUF general.architecture -> the Hugging Face architecture we run it as ("llama" with experts: Mixtral)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
# whose q/k rows llama.cpp's converter reordered for its interleaved rope (LlamaModel.permute)
_PERMUTED = ("LlamaForCausalLM", "MixtralForCausalLM")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# a block's experts, one 3-D tensor each -> transformers' names of stacked experts (no ".weight"); gate and up are
# joined into gate_up_proj [E, 2 * I, H] as they load (llama.cpp may also store them joined: ffn_gate_up_exps)
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_gate_up_exps": "gate_up_proj",
                 "ffn_down_exps": "down_proj"}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _read(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    """A read-only view of the file, kept for the next load of it in this process: parsing the metadata (the
    tokenizer's 49k tokens and merges for the default model) takes ~5 s. Size and mtime key it to the file's
    contents."""
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a truncated or foreign file
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_to_hf_config(reader: GGUFReader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported GGUF general.architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg = {
        "architectures": [_ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length", hidden // heads),
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta("rope.freq_base", 10000.0),
        "max_position_embeddings": meta("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if meta("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    if arch in ("qwen2moe", "qwen3moe") or meta("expert_count") or any(_is_expert(t.name) for t in reader.tensors):
        cfg.update(_moe_config(reader, arch, cfg))
    return cfg


def _is_expert(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "blk" and len(parts) > 2 and parts[2] in _EXPERT_NAMES


def _one_value(reader: GGUFReader, key: str):
    """A metadata value that llama.cpp may store per layer (get_key_or_arr); tokenmill runs every layer alike."""
    value = _field(reader, key)
    if isinstance(value, list):
        if len(set(value)) > 1:
            raise ValueError(f"GGUF {key} differs between layers ({value}); tokenmill needs one value for all")
        value = value[0] if value else None
    return value


def _positive(key: str, value, limit: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"GGUF {key} must be a positive integer{limit}, got {value!r}")
    return value


def _moe_config(reader: GGUFReader, arch: str, cfg: dict) -> dict:
    """The Hugging Face expert fields of an MoE file, read as llama.cpp reads them (src/models/{llama,qwen2moe,
    qwen3moe}.cpp), its expert tensors checked against them."""
    experts = _positive(f"{arch}.expert_count", _field(reader, f"{arch}.expert_count"))
    used = _one_value(reader, f"{arch}.expert_used_count")
    if not isinstance(used, int) or not 1 <= used <= experts:
        raise ValueError(f"GGUF {arch}.expert_used_count must be an integer from 1 to {arch}.expert_count "
                         f"({experts}), got {used!r}")
    layers = cfg["num_hidden_layers"]
    sparse = {int(t.name.split(".")[1]) for t in reader.tensors if _is_expert(t.name)}
    dense = [i for i in range(layers) if i not in sparse]
    if arch == "llama":  # Mixtral: the experts are feed_forward_length wide, every block has them
        if dense:
            raise ValueError(f"GGUF llama.expert_count is {experts} but blocks {dense} have no ffn_*_exps tensors")
        width_key = "llama.feed_forward_length"
        width = _positive(width_key, cfg["intermediate_size"])
        out = {"architectures": ["MixtralForCausalLM"], "num_local_experts": experts, "num_experts_per_tok": used}
    else:
        # llama.cpp: an expert is expert_feed_forward_length wide, else feed_forward_length / expert_used_count;
        # its graphs fix the renormalisation of the top-k weights (qwen2moe: none, qwen3moe: to sum 1), no key says
        ff = cfg["intermediate_size"]
        if dense and not ff:
            raise ValueError(f"GGUF {arch}.feed_forward_length must be set: blocks {dense} have no experts")
        width_key = f"{arch}.expert_feed_forward_length"
        width = _positive(width_key, _one_value(reader, width_key) or (ff // used if ff else None),
                          f" (or {arch}.feed_forward_length set)")
        out = {"num_experts": experts, "num_experts_per_tok": used, "moe_intermediate_size": width,
               "norm_topk_prob": arch == "qwen3moe", "decoder_sparse_step": 1, "mlp_only_layers": dense,
               "intermediate_size": ff or 0}
        if arch == "qwen2moe":
            key = f"{arch}.expert_shared_feed_forward_length"
            out["shared_expert_intermediate_size"] = _positive(key, _field(reader, key) or ff)
    _check_expert_tensors(reader, f"{arch}.expert_count", experts, width_key, width, cfg["hidden_size"])
    return out


def _check_expert_tensors(reader: GGUFReader, count_key: str, experts: int, width_key: str, width: int,
                          hidden: int) -> None:
    """Every router and expert tensor has the shape the metadata gives (torch order), else a ValueError naming both."""
    expected = {"ffn_gate_inp": (experts, hidden), "ffn_gate_exps": (experts, width, hidden),
                "ffn_up_exps": (experts, width, hidden), "ffn_gate_up_exps": (experts, 2 * width, hidden),
                "ffn_down_exps": (experts, hidden, width)}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or len(parts) < 3 or parts[2] not in expected:
            continue
        kind = parts[2]
        shape = tuple(int(d) for d in reversed(t.shape))
        if len(shape) == len(expected[kind]) and shape[0] != experts:
            raise ValueError(f"GGUF tensor {t.name} holds {shape[0]} experts but {count_key} is {experts}")
        if shape != expected[kind]:
            raise ValueError(f"GGUF tensor {t.name} has shape {list(shape)}, but {count_key}, {width_key} ({width}) "
                             f"and the embedding length ({hidden}) give {list(expected[kind])}")


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], parts[3]
        if kind in _EXPERT_NAMES:
            return f"model.layers.{layer}.mlp.experts.{_EXPERT_NAMES[kind]}"
        if kind not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in the model")
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    if parts[0] not in _TOP_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in the model")
    prefix = "" if parts[0] == "output" else "model."
    return f"{prefix}{_TOP_NAMES[parts[0]]}.{parts[1]}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (interleaved rope pairs) back to HF's rotate-half layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permutation(name: str, cfg: dict) -> int | None:
    """The head count whose rope reordering llama.cpp applied to this tensor's rows, or None."""
    if cfg["architectures"][0] not in _PERMUTED:
        return None
    if name.endswith("attn_q.weight"):
        return cfg["num_attention_heads"]
    if name.endswith("attn_k.weight"):
        return cfg["num_key_value_heads"]
    return None


def gguf_weights(reader: GGUFReader, cfg: dict) -> dict[str, torch.Tensor]:
    """All tensors, dequantised to float32, under Hugging Face names and layouts."""
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if (heads := _permutation(t.name, cfg)) is not None:
            w = _unpermute(w, heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:  # unquantised tensors are views of the read-only memory map
            w = w.copy()
        name = _hf_name(t.name)
        if name.endswith("shared_expert_gate.weight"):
            w = w.reshape(1, -1)  # llama.cpp declares it 1-D [H]; transformers' Linear(H, 1) is [1, H]
        weights[name] = torch.from_numpy(w)
    return _join_gate_up(weights)


def _join_gate_up(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each block's `experts.gate_proj` and `experts.up_proj` [E, I, H] -> one `experts.gate_up_proj` [E, 2 * I, H],
    the stacked layout load_weights takes."""
    for gate in [name for name in tensors if name.endswith(".experts.gate_proj")]:
        prefix = gate.removesuffix("gate_proj")
        if prefix + "up_proj" not in tensors:
            raise ValueError(f"GGUF file has {_gguf_name(gate)} but not {_gguf_name(prefix + 'up_proj')}")
        tensors[prefix + "gate_up_proj"] = torch.cat([tensors.pop(gate), tensors.pop(prefix + "up_proj")], 1)
    if up := next((name for name in tensors if name.endswith(".experts.up_proj")), None):
        raise ValueError(f"GGUF file has {_gguf_name(up)} but not {_gguf_name(up.replace('up_proj', 'gate_proj'))}")
    return tensors


def _gguf_name(expert_name: str) -> str:
    """model.layers.N.mlp.experts.gate_proj -> blk.N.ffn_gate_exps.weight (for messages)."""
    layer, part = expert_name.split(".")[2], expert_name.rsplit(".", 1)[1]
    return f"blk.{layer}.{next(k for k, v in _EXPERT_NAMES.items() if v == part)}.weight"


@dataclass
class QuantizedWeight:
    """A weight [rows, cols] (stacked experts: [E, rows, cols]) as a GGUF block format stores it: in groups of 32
    along each row, integers q (Q4_1: 0..15, Q8_0: -127..127), a float16 scale d per group and, for Q4_1, a float16
    minimum m (w = d * q + m)."""
    kind: str                  # "q4_1" | "q8_0"
    q: torch.Tensor            # uint8 [rows, cols] (Q4_1) or int8 (Q8_0)
    d: torch.Tensor            # float16 [rows, cols / 32]
    m: torch.Tensor | None     # float16 [rows, cols / 32], Q4_1 only


def _blocks(t, width: int) -> np.ndarray:
    rows = int(np.prod([int(d) for d in t.shape[1:]]))
    return np.asarray(t.data).reshape(rows, -1, width)


def gguf_quantized(reader: GGUFReader, cfg: dict) -> dict[str, QuantizedWeight]:
    """The Q4_1 and Q8_0 matrices of the file as stored, under Hugging Face names and row order; tensors of other
    types are left out (the caller decides whether it can do without them). Stacked experts keep their expert
    dimension ([E, rows, ...]) and gate and up stay apart (`experts.gate_proj`, `experts.up_proj`)."""
    out = {}
    for t in reader.tensors:
        if t.tensor_type == GGMLQuantizationType.Q4_1:
            b = _blocks(t, 20)  # per block: d, m (float16), then 16 bytes holding q[j] | q[j + 16] << 4
            d, m = b[..., 0:2].copy().view(np.float16)[..., 0], b[..., 2:4].copy().view(np.float16)[..., 0]
            qs = b[..., 4:]
            q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(b.shape[0], -1)
            weight = QuantizedWeight("q4_1", q, d, m)
        elif t.tensor_type == GGMLQuantizationType.Q8_0:
            b = _blocks(t, 34)  # per block: d (float16), then 32 int8
            d = b[..., 0:2].copy().view(np.float16)[..., 0]
            weight = QuantizedWeight("q8_0", b[..., 2:].copy().view(np.int8).reshape(b.shape[0], -1), d, None)
        else:
            continue
        if (heads := _permutation(t.name, cfg)) is not None:
            weight = QuantizedWeight(weight.kind, *(None if a is None else _unpermute(a, heads)
                                                    for a in (weight.q, weight.d, weight.m)))
        lead = [int(d) for d in reversed(t.shape[1:])]  # [rows], or [experts, rows] for stacked experts
        out[_hf_name(t.name)] = QuantizedWeight(weight.kind, *(None if a is None else torch.from_numpy(
            np.ascontiguousarray(a).reshape(*lead, -1)) for a in (weight.q, weight.d, weight.m)))
    return out
