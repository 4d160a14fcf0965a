"""Checkpoint loading: HF directories and GGUF files, and clear errors for what cannot be loaded."""
import json
import shutil

import pytest
import torch

from engine import LLM
from models.config import ModelConfig
from models.gguf_loader import _unpermute
from models.loading import load_model, resolve_dtype


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture_is_rejected_by_name(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("qwen2"), tmp_path)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MysteryForCausalLM"):
        LLM(str(directory))


def test_missing_model_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "nowhere"))


def test_directory_without_weights_names_the_problem(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("qwen2"), tmp_path)
    for f in directory.glob("*.safetensors"):
        f.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="pickled checkpoints are never loaded"):
        LLM(str(directory))


def test_corrupt_safetensors_file_is_a_value_error(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("qwen2"), tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(directory))


def test_missing_shard_named_in_the_index_is_reported(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("llama"), tmp_path)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1, "the llama fixture should be sharded"
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match=shards[0].name):
        LLM(str(directory))


def test_checkpoint_missing_a_weight_is_rejected(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    directory = _copy(tiny_checkpoint("qwen2"), tmp_path)
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(ValueError, match="gate_up_proj"):
        LLM(str(directory))


def test_corrupt_gguf_file_is_a_value_error(smollm_gguf, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(smollm_gguf.read_bytes()[:4096])
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(str(bad))


def test_gguf_unpermute_inverts_llama_cpp_rope_permutation():
    n_head, head_dim, cols = 3, 8, 5
    w = torch.randn(n_head * head_dim, cols).numpy()
    # llama.cpp's converter: rows of each head regrouped from rotate-half to interleaved pairs
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert (_unpermute(permuted, n_head) == w).all()


@pytest.mark.slow
def test_default_gguf_loads_with_the_shape_the_notes_give():
    loaded = load_model("default", dtype="float32")
    cfg = loaded.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.rope_theta == 100000
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    assert loaded.tokenizer.eos_token_id == 2


def test_config_reads_transformers_5_rope_parameters():
    cfg = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None and cfg.num_kv_heads == 2


def test_unsupported_rope_scaling_is_rejected():
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                             "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_dtype_names_resolve_and_bad_names_are_rejected():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8", cpu)
