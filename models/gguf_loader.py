"""Read a GGUF file: its config from the metadata, its tensors dequantised with the `gguf` package, and its Q4_1
and Q8_0 tensors as stored (for the kernels that compute with them, models/quantize.py)."""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

# GGUF general.architecture -> the Hugging Face architecture we run it as
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
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
    return cfg


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], parts[3]
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
    if cfg["architectures"][0] != "LlamaForCausalLM":
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
        weights[_hf_name(t.name)] = torch.from_numpy(w)
    return weights


@dataclass
class QuantizedWeight:
    """A weight [rows, cols] as a GGUF block format stores it: in groups of 32 along each row, integers q
    (Q4_1: 0..15, Q8_0: -127..127), a float16 scale d per group and, for Q4_1, a float16 minimum m
    (w = d * q + m)."""
    kind: str                  # "q4_1" | "q8_0"
    q: torch.Tensor            # uint8 [rows, cols] (Q4_1) or int8 (Q8_0)
    d: torch.Tensor            # float16 [rows, cols / 32]
    m: torch.Tensor | None     # float16 [rows, cols / 32], Q4_1 only


def _blocks(t, width: int) -> np.ndarray:
    rows = int(np.prod([int(d) for d in t.shape[1:]]))
    return np.asarray(t.data).reshape(rows, -1, width)


def gguf_quantized(reader: GGUFReader, cfg: dict) -> dict[str, QuantizedWeight]:
    """The Q4_1 and Q8_0 matrices of the file as stored, under Hugging Face names and row order; tensors of other
    types are left out (the caller decides whether it can do without them)."""
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
        out[_hf_name(t.name)] = QuantizedWeight(weight.kind, *(None if a is None else torch.from_numpy(
            np.ascontiguousarray(a)) for a in (weight.q, weight.d, weight.m)))
    return out
