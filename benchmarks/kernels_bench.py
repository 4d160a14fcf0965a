"""Kernel benchmark on a GPU: the Triton kernels against the memory roofline, torch SDPA and eager torch.

- decode attention, batch 1-256 x context 512-16k: achieved GB/s (K/V bytes read) as a share of a measured
  device-to-device copy's GB/s (target >= 70%);
- prefill attention, one causal sequence of 1k-8k tokens: TFLOP/s against SDPA's flash backend (target >= 0.8x);
- fused rms_norm (+ residual), silu_and_mul and rotary against their eager torch references.

    python benchmarks/kernels_bench.py                 # on a CUDA machine; writes results/gpu_kernels.md
    python benchmarks/kernels_bench.py --device cpu --backend torch --quick   # a smoke run of the script itself
"""
import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import TORCH, get_backend, reference  # noqa: E402

PAGE = 16


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds per call, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, repeat: int, size: int) -> float:
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / timed(lambda: dst.copy_(src), device, repeat)  # read + write


def bench_decode(backend, device, dtype, batches, contexts, heads, repeat, roofline) -> list[str]:
    num_heads, kv_heads, head_dim = heads
    rows = ["| batch | context | kernel µs | GB/s | % of copy | torch reference µs | speed-up |",
            "|---|---|---|---|---|---|---|"]
    for batch in batches:
        for ctx in contexts:
            blocks = batch * ctx // PAGE
            if blocks * PAGE * kv_heads * head_dim * 2 * dtype.itemsize > 0.5 * _free(device):
                continue
            k_cache = torch.randn(blocks, PAGE, kv_heads, head_dim, device=device, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(blocks, device=device, dtype=torch.int32).view(batch, ctx // PAGE)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
            t = timed(lambda: backend.decode_attention(q, k_cache, v_cache, tables, lens, 0.1), device, repeat)
            t_ref = timed(lambda: reference.decode_attention(q, k_cache, v_cache, tables, lens, 0.1), device, repeat)
            gbs = 2 * k_cache.numel() * dtype.itemsize / t / 1e9
            rows.append(f"| {batch} | {ctx} | {t * 1e6:.0f} | {gbs:.0f} | {gbs / roofline:.0%} | "
                        f"{t_ref * 1e6:.0f} | {t_ref / t:.2f}x |")
    return rows


def bench_prefill(backend, device, dtype, lengths, heads, repeat) -> list[str]:
    num_heads, kv_heads, head_dim = heads
    rows = ["| tokens | kernel ms | TFLOP/s | SDPA ms | SDPA TFLOP/s | kernel / SDPA speed |",
            "|---|---|---|---|---|---|"]
    for n in lengths:
        blocks = -(-n // PAGE)
        k_cache = torch.randn(blocks, PAGE, kv_heads, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        tables = torch.arange(blocks, device=device, dtype=torch.int32).view(1, -1)
        q = torch.randn(n, num_heads, head_dim, device=device, dtype=dtype)
        k, v = k_cache.view(-1, kv_heads, head_dim)[:n], v_cache.view(-1, kv_heads, head_dim)[:n]
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        lens = torch.tensor([n], dtype=torch.int32, device=device)
        t = timed(lambda: backend.prefill_attention(q, k, v, cu, k_cache, v_cache, tables, lens, 0.1, n),
                  device, repeat)
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # noqa: E731
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ks, vs = (x.repeat_interleave(num_heads // kv_heads, dim=1) for x in (ks, vs))  # flash wants MHA
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t_sdpa = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), device, repeat)
        else:
            t_sdpa = timed(sdpa, device, repeat)
        flops = 2 * 2 * num_heads * head_dim * n * n / 2  # QK^T and PV, causal half
        rows.append(f"| {n} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} | {t_sdpa * 1e3:.2f} | "
                    f"{flops / t_sdpa / 1e12:.1f} | {t_sdpa / t:.2f}x |")
    return rows


def bench_fused(backend, device, dtype, tokens, hidden, heads, repeat) -> list[str]:
    num_heads, kv_heads, head_dim = heads
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=dtype)
    gu = torch.randn(tokens, 2 * 4 * hidden, device=device, dtype=dtype)
    qkv = torch.randn(tokens, (num_heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    q = qkv[:, :num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    cos = torch.randn(tokens, head_dim // 2, device=device, dtype=dtype)
    sin = torch.randn_like(cos)
    cases = [("rms_norm", lambda b: b.rms_norm(x, w, 1e-5)),
             ("rms_norm + residual", lambda b: b.rms_norm(x, w, 1e-5, res)),
             ("silu_and_mul", lambda b: b.silu_and_mul(gu)),
             ("rotary q, k", lambda b: b.rotary(q, k, cos, sin))]
    rows = ["| op | kernel µs | eager torch µs | speed-up |", "|---|---|---|---|"]
    for name, call in cases:
        t = timed(lambda: call(backend), device, repeat)
        t_ref = timed(lambda: call(TORCH), device, repeat)
        rows.append(f"| {name} | {t * 1e6:.0f} | {t_ref * 1e6:.0f} | {t_ref / t:.2f}x |")
    return rows


def _free(device) -> int:
    return torch.cuda.mem_get_info()[0] if device.type == "cuda" else 4 * 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton", choices=["triton", "torch"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_kernels.md"))
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kernels_bench: no CUDA device here (try --device cpu --backend torch --quick)", file=sys.stderr)
        return 2
    backend = get_backend(args.backend, device)
    heads = tuple(int(v) for v in args.heads.split(","))
    quick = args.quick
    roofline = copy_bandwidth(device, args.repeat, 2**20 if quick else 2**30) / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Kernel benchmark: {name}", "",
             f"{datetime.date.today()} · torch {torch.__version__} · {args.dtype} · heads {heads} · backend "
             f"{backend.name} · device-to-device copy {roofline:.0f} GB/s", "", "## Decode attention", "",
             *bench_decode(backend, device, dtype, [1, 2] if quick else [1, 16, 64, 256],
                           [32, 64] if quick else [512, 2048, 16384], heads, args.repeat, roofline), "",
             "## Prefill attention (one causal sequence)", "",
             *bench_prefill(backend, device, dtype, [32, 64] if quick else [1024, 2048, 4096, 8192], heads,
                            args.repeat), "",
             "## Fused ops", "",
             *bench_fused(backend, device, dtype, 8 if quick else 4096, 64 if quick else 4096, heads, args.repeat),
             "", f"Command: `python benchmarks/kernels_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
