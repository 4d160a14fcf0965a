"""CPU kernels for AVX2 machines as torch ops, `torch.ops.tokenmill.*` (C++ in kernels/cpu/), with their plain-torch
references (the test oracle) and the weight packing they read.

- `q4_1_linear(x, qs, scales, n, bias=None)`: x float32 [..., K] times GGUF Q4_1 weights [n, K] transposed (groups
  of 32 along K, w = d * q + m, q in 0..15, d and m float16), -> float32 [..., n].
- `q8_0_linear(x, qs, scales, n, bias=None)`: the same with GGUF Q8_0 weights (w = d * q, q in -127..127).
- `quantize_q8_1(x) -> (q, dx, sx)`: the activation quantization both linears apply to x first, per row and
  32-block: dx = max|x| / 127, q = round(x / dx) as int8, sx = dx * sum(q).
- `paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)`: kernels.reference's
  decode_attention, reading K/V in place through the block table; the caches hold float32 or float16 (widened as
  they are loaded, summed in float32).
- `paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)`: causal attention
  of a flat batch of query chunks (kernels.reference's prefill_attention, cached prefixes included) whose K/V are
  already stored; each query row is the decode op's computation with its own context, so a token's output is
  bit-identical whether it was prefilled (in one chunk or several) or decoded.
- `store_kv(k, v, k_cache, v_cache, slot_mapping)`: kernels.reference's store_kv (a slot < 0 writes nothing; float32
  rows into a float16 cache are rounded to nearest-even), an op that declares the caches mutated so that a compiled
  step writes them in place.
- `rms_norm(x, weight, eps)`, `rms_norm_residual(x, residual, weight, eps) -> (out, residual + x)`,
  `silu_and_mul(x)`, `rotary(q, k, cos, sin)` (neox layout): kernels.reference's per-token ops, float32, on
  [rows, D] or [n, heads, D] inputs at any strides (e.g. head views of a fused qkv output); outputs contiguous.
  rotary is bit-identical to the reference; the others round their own way (within a few float32 ulps).

Then y[m, n] = sum over groups g of (d[n, g] * dx[m, g]) * dot(qw[n, g], qx[m, g]) + m[n, g] * sx[m, g], the dot
products in integers. Every output row is bit-identical whatever the number of rows in the call, the row's place
among them and the thread count; an attention output likewise whatever else is in the batch and the table width.
So one C++ computation serves a token in eager prefill and in a compiled decode step alike (inductor calls the ops
as extern kernels).

The extension is compiled on first use (about a minute; `load()`) into kernels.cache_dir()/torch_ext or
$TOKENMILL_EXT_DIR, and needs an x86-64 CPU with AVX2, FMA and F16C, a C++ compiler and ninja. The weight formats
and the linears' references are in kernels/cpu_quant.py.
"""
import logging
import os
import platform
import shutil
import sysconfig
import threading
from pathlib import Path

import torch

from kernels import cache_dir, reference
from kernels.cpu_quant import GROUP

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "cpu" / name for name in ("quant_matmul.cpp", "paged_attention.cpp",
                                                               "store_kv.cpp", "row_ops.cpp")]
# no fused multiply-adds but those written out: a contraction chosen by the compiler could differ between code paths.
# -fopenmp: at::parallel_for is inline OpenMP, serial without it; the library then binds to torch's own libgomp.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
_lock = threading.Lock()
_loaded = False


def build_dir() -> Path:
    base = os.environ.get("TOKENMILL_EXT_DIR") or cache_dir() / "torch_ext"
    return Path(base) / f"torch-{torch.__version__}"


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _ninja_dir() -> str | None:
    """Where ninja is: on PATH, or beside this interpreter (pip's ninja in a venv that is not activated)."""
    found = shutil.which("ninja") or shutil.which("ninja", path=sysconfig.get_path("scripts"))
    return os.path.dirname(found) if found else None


def missing() -> str | None:
    """Why the extension cannot be built on this machine, or None when it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they need an x86-64 CPU, this one is {platform.machine()}"
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo: torch's own dispatch check (AVX2 there implies FMA; F16C came before both)
        flags = {"avx2", "fma", "f16c"} if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else set()
    lacking = [f.upper() for f in ("avx2", "fma", "f16c") if f not in flags]
    if lacking:
        return f"the CPU lacks {', '.join(lacking)}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)"
    if _ninja_dir() is None:
        return "torch's extension builder needs ninja, which is not installed (pip install ninja)"
    return None


def load():
    """Build (first time) and load the extension, once per process; returns the `torch.ops.tokenmill` namespace.
    Raises RuntimeError naming the cause when this machine cannot build it (see `missing`)."""
    global _loaded
    with _lock:
        if not _loaded:
            reason = missing()
            if reason:
                raise RuntimeError(f"tokenmill's CPU kernels are unavailable: {reason}")
            from torch.utils import cpp_extension
            directory = build_dir()
            directory.mkdir(parents=True, exist_ok=True)
            path = os.environ.get("PATH", "")
            ninja = _ninja_dir()
            if ninja not in path.split(os.pathsep):
                os.environ["PATH"] = ninja + os.pathsep + path
            log.info("loading tokenmill's CPU kernels from %s (the first build takes about a minute)", directory)
            try:
                cpp_extension.load(name="tokenmill_cpu", sources=[str(s) for s in _SOURCES], extra_cflags=_CFLAGS,
                                   extra_ldflags=["-fopenmp"], build_directory=str(directory),
                                   is_python_module=False)
            finally:
                os.environ["PATH"] = path
            _register_fakes()
            _loaded = True
    return torch.ops.tokenmill


def available() -> bool:
    """True when the ops can run here (building them on the first call); False when the CPU or the toolchain lacks
    what they need. A build that fails on a machine that has everything raises."""
    if missing():
        return False
    load()
    return True


def _register_fakes() -> None:
    """Shapes for torch.compile: inductor calls the ops as extern kernels, without graph breaks."""
    @torch.library.register_fake("tokenmill::quantize_q8_1")
    def _(x):
        groups = (*x.shape[:-1], x.shape[-1] // GROUP)
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(groups), x.new_empty(groups)

    @torch.library.register_fake("tokenmill::q4_1_linear")
    def _(x, qs, scales, n, bias=None):
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("tokenmill::q8_0_linear")
    def _(x, qs, scales, n, bias=None):
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("tokenmill::paged_decode_attention")
    def _(q, k_cache, v_cache, block_tables, context_lens, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("tokenmill::paged_prefill_attention")
    def _(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("tokenmill::store_kv")
    def _(k, v, k_cache, v_cache, slot_mapping):
        return None

    @torch.library.register_fake("tokenmill::rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake("tokenmill::rms_norm_residual")
    def _(x, residual, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("tokenmill::silu_and_mul")
    def _(x):
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake("tokenmill::rotary")
    def _(q, k, cos, sin):
        return q.new_empty(q.shape), k.new_empty(k.shape)


# ---- references: the ops' math in plain torch -------------------------------------------------------------------------

def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    """Masked softmax attention in torch (kernels.reference.decode_attention)."""
    return reference.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                                      block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """kernels.reference.prefill_attention, the new tokens' K/V read back from the cache."""
    page, bounds = k_cache.shape[1], cu_seqlens_q.tolist()
    slots = [torch.empty(0, dtype=torch.long)]
    for b, ctx in enumerate(context_lens.tolist()):
        pos = torch.arange(ctx - (bounds[b + 1] - bounds[b]), ctx)
        slots.append(block_tables[b, pos // page].long() * page + pos % page)
    slots = torch.cat(slots)
    k, v = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
    return reference.prefill_attention(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens, scale)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return reference.rms_norm(x, weight, eps)


def rms_norm_residual_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.rms_norm(x, weight, eps, residual)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    return reference.silu_and_mul(x)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """neox layout; bit-identical to the op."""
    return reference.rotary(q, k, cos, sin)


# ---- the cpu backend: the ops behind kernels.Backend's signatures ------------------------------------------------

def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    torch.ops.tokenmill.store_kv(k, v, k_cache, v_cache, slot_mapping)


def prefill_attention(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens, scale,
                      max_seqlen_q=None) -> torch.Tensor:
    """k and v are read back from the cache, where store_kv has put them."""
    return torch.ops.tokenmill.paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                                      scale)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    return torch.ops.tokenmill.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def rms_norm(x, weight, eps, residual=None):
    if residual is None:
        return torch.ops.tokenmill.rms_norm(x, weight, eps)
    return torch.ops.tokenmill.rms_norm_residual(x, residual, weight, eps)


def silu_and_mul(x) -> torch.Tensor:
    return torch.ops.tokenmill.silu_and_mul(x)


def rotary(q, k, cos, sin, interleaved: bool = False):
    if interleaved:  # the op has the neox layout only
        return reference.rotary(q, k, cos, sin, interleaved)
    return torch.ops.tokenmill.rotary(q, k, cos, sin)


__all__ = ["available", "build_dir", "decode_attention", "load", "missing", "paged_decode_attention_reference",
           "paged_prefill_attention_reference", "prefill_attention", "rms_norm", "rms_norm_reference",
           "rms_norm_residual_reference", "rotary", "rotary_reference", "silu_and_mul", "silu_and_mul_reference",
           "store_kv"]
