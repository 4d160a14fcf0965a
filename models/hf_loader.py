"""Read a Hugging Face checkpoint directory: config.json, *.safetensors (sharded or not), generation_config.json."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")
    cfg = read_json(path)
    gen = directory / "generation_config.json"
    if gen.is_file() and "eos_token_id" in (gen_cfg := read_json(gen)):
        eos = gen_cfg["eos_token_id"]
        cfg["eos_token_id"] = eos  # generation_config wins: it lists every id that ends a turn
    return cfg


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not files:
            raise ValueError(f"{index} has an empty weight_map")
        paths = [directory / f for f in files]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{index} names {p.name}, which is missing")
        return paths
    if (directory / "model.safetensors").is_file():  # a training output also holds train_weights, adapter_model
        return [directory / "model.safetensors"]
    paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickled checkpoints are never loaded; convert them to safetensors)" \
            if pickled else ""
        raise FileNotFoundError(f"{directory} has no *.safetensors weights{hint}")
    return paths


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(directory):
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    return weights
