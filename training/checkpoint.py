"""Checkpoints in the Hugging Face layout (config.json, model.safetensors, generation_config.json, the tokenizer
files) plus, for resuming, train_state.pt with the optimizer, step and RNG states."""
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.llama import LlamaForCausalLM
from models.reward import RewardModel
from text.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def save_pretrained(model: LlamaForCausalLM, tokenizer: str | Path | Tokenizer, out_dir: str | Path) -> Path:
    """Write `model` and its tokenizer (a directory to copy the files from, or a Tokenizer, e.g. one rebuilt from
    a GGUF file) as a directory that `tokenmill serve` and transformers load."""
    cfg = model.config
    weights = model.hf_state_dict()
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    out = _write(out_dir, cfg.to_hf(), weights, next(model.parameters()).dtype, tokenizer)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids}, indent=2) + "\n")
    return out


def save_reward_model(model: RewardModel, tokenizer: str | Path | Tokenizer, out_dir: str | Path) -> Path:
    """Write a reward model as transformers' *ForSequenceClassification (num_labels 1, pad_token_id set)."""
    return _write(out_dir, model.hf_config(), model.hf_state_dict(), model.score.weight.dtype, tokenizer)


def _write(out_dir: str | Path, config: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype,
           tokenizer: str | Path | Tokenizer) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save_pretrained(out)
    elif Path(tokenizer).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy2(Path(tokenizer) / name, out / name)
    return out


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
                         f"{vocab_size}: they do not belong together")


def save_train_state(out_dir: Path, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None) -> None:
    state = {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
             "python_rng": random.getstate(), **(extra or {})}
    tmp = out_dir / "train_state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out_dir / "train_state.pt")  # a crash while saving never leaves a half-written state


def load_train_state(out_dir: Path) -> dict:
    state = torch.load(out_dir / "train_state.pt", weights_only=False)  # our own file, written by save_train_state
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state
