"""The CPU kernels of kernels/cpu_ops.py against torch on SmolLM2-135M's shapes.

- Projections: every projection of the 30 layers (K x N = 576x960 qkv, 576x576 o, 576x3072 gate_up, 1536x576 down),
  each layer with its own weights so they stream from memory as in a real decode step, at each row count M:
  float32 `torch.mm(x, w.t())` (F.linear), float32 `(w @ x.t()).t()` (models/cpu_linear.py's order; one row as two,
  as there), torch's int4 kernel with bfloat16 activations (quantization="int4", models/quantize.py), and
  q4_1_linear. The output head (576 x 49152): the two float32 orders and q8_0_linear.
- Paged decode attention at batch x context (9 query heads, 3 KV heads, head_dim 64, pages of 16, one layer's
  cache): paged_decode_attention against kernels.reference.decode_attention.
- Paged prefill attention of one chunk of 128 / 512 tokens (alone, and after a cached prefix):
  paged_prefill_attention against kernels.reference.prefill_attention.
- Row ops at 1 / 32 / 512 rows: rms_norm (576), silu_and_mul (2 x 1536), rotary (9 + 3 heads of 64) against
  kernels.reference's torch versions.

    .venv/bin/python benchmarks/cpu_kernels_bench.py [--rows 1,2,4,...,512] [--repeat 5] [--threads 2] [--quick]
        [--sections linears,attention,prefill,row_ops]

Writes benchmarks/results/cpu_kernels.md. Each cell is the best of --repeat passes (the machine may be shared).
"""
import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import cpu_ops, cpu_quant, reference  # noqa: E402

LAYERS, HIDDEN, FFN, VOCAB = 30, 576, 1536, 49152
PROJECTIONS = [(HIDDEN, 960), (HIDDEN, HIDDEN), (HIDDEN, 2 * FFN), (FFN, HIDDEN)]  # (K, N)
HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16


def best_of(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Weights:
    """One [N, K] projection in every form the benchmark multiplies with: float32 (the dequantized Q4_1 weights),
    torch's int4 packing and ours."""

    def __init__(self, k: int, n: int, gen: torch.Generator, q8: bool = False):
        if q8:
            q = torch.randint(-127, 128, (n, k), generator=gen)
            d = (torch.rand(n, k // 32, generator=gen) * 1e-3).half().float()
            self.packed = cpu_quant.pack_q8_0(q, d)
            self.w = cpu_quant.dequantize_q8_0(*self.packed)
            return
        q = torch.randint(0, 16, (n, k), generator=gen)
        d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
        m = (-8 * d).half().float()
        self.packed = cpu_quant.pack_q4_1(q, d, m)
        self.w = cpu_quant.dequantize_q4_1(*self.packed)
        # torch's int4 kernel computes (q - 8) * scale + zero: zero = min + 8 * scale, [groups, N, 2] bfloat16
        self.int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.scales_zeros = torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def bytes(self, kind: str) -> int:
        if kind == "float32":
            return self.w.numel() * 4
        if kind == "int4":
            return self.int4.numel() * self.int4.element_size() + self.scales_zeros.numel() * 2
        return sum(t.numel() * t.element_size() for t in self.packed[:2])


def mm(x, wt: Weights):
    return torch.mm(x, wt.w.t())


def mm_transposed(x, wt: Weights):
    if x.shape[0] == 1:
        return torch.mm(wt.w, x.expand(2, -1).t()).t()[:1]
    return torch.mm(wt.w, x.t()).t()


def int4_mm(x, wt: Weights):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), wt.int4, 32, wt.scales_zeros).float()


def ours(ops):
    def call(x, wt: Weights):
        linear = ops.q8_0_linear if isinstance(wt.packed, cpu_quant.PackedQ8_0) else ops.q4_1_linear
        return linear(x, *wt.packed)
    return call


def bench_linears(ops, rows: list[int], repeat: int, layers: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    weights = [[Weights(k, n, gen) for k, n in PROJECTIONS] for _ in range(layers)]
    head = Weights(HIDDEN, VOCAB, gen, q8=True)
    flat = [w for layer in weights for w in layer]
    columns = [("float32 mm", mm, "float32"), ("float32 (w @ x.T).T", mm_transposed, "float32"),
               ("int4 bf16 (torch)", int4_mm, "int4"), ("q4_1_linear", ours(ops), "ours")]
    head_columns = [columns[0], columns[1], ("q8_0_linear", ours(ops), "ours")]
    table = ["| M | " + " | ".join(f"proj: {c[0]} ms" for c in columns) + " | q4_1 vs best float32 | "
             + " | ".join(f"head: {c[0]} ms" for c in head_columns) + " | q8_0 vs best float32 |",
             "|---" * (len(columns) + len(head_columns) + 3) + "|"]
    gbs_at_1 = {}
    for m in rows:
        x = {k: torch.randn(m, k, generator=gen) for k in {k for k, _ in PROJECTIONS}}
        proj = [best_of(lambda: [fn(x[w.w.shape[1]], w) for w in flat], repeat) for _, fn, _ in columns]
        heads = [best_of(lambda: fn(x[HIDDEN], head), repeat) for _, fn, _ in head_columns]
        cells = [f"{t * 1e3:.1f}" for t in proj] + [f"{min(proj[:2]) / proj[3]:.2f}x"]
        cells += [f"{t * 1e3:.1f}" for t in heads] + [f"{min(heads[:2]) / heads[2]:.2f}x"]
        table.append(f"| {m} | " + " | ".join(cells) + " |")
        print(table[-1], flush=True)
        if m == 1:
            for (name, _, kind), t in zip(columns, proj):
                gbs_at_1[f"projections, {name}"] = sum(w.bytes(kind) for w in flat) / t / 1e9
            for (name, _, kind), t in zip(head_columns, heads):
                gbs_at_1[f"head, {name}"] = head.bytes(kind) / t / 1e9
    lines = table
    if gbs_at_1:
        lines += ["", "Weight bytes read per second at M = 1:", "", "| weights, kernel | MB | GB/s |", "|---|---|---|"]
        sizes = {f"projections, {name}": sum(w.bytes(kind) for w in flat) for name, _, kind in columns}
        sizes |= {f"head, {name}": head.bytes(kind) for name, _, kind in head_columns}
        lines += [f"| {name} | {sizes[name] / 1e6:.0f} | {g:.1f} |" for name, g in gbs_at_1.items()]
    return lines


def bench_attention(ops, batches: list[int], contexts: list[int], repeat: int) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    lines = ["| batch | context | paged_decode_attention ms | GB/s (K+V) | reference ms | speed-up |",
             "|---|---|---|---|---|---|"]
    for batch in batches:
        for ctx in contexts:
            blocks = batch * ctx // PAGE
            k_cache = torch.randn(blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen)
            v_cache = torch.randn(blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen)
            tables = torch.randperm(blocks, generator=gen).to(torch.int32).view(batch, ctx // PAGE)
            lens = torch.full((batch,), ctx, dtype=torch.int32)
            q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
            args = (q, k_cache, v_cache, tables, lens, HEAD_DIM ** -0.5)
            t = best_of(lambda: ops.paged_decode_attention(*args), repeat)
            t_ref = best_of(lambda: reference.decode_attention(*args), repeat)
            gbs = 2 * k_cache.numel() * 4 / t / 1e9
            lines.append(f"| {batch} | {ctx} | {t * 1e3:.3f} | {gbs:.1f} | {t_ref * 1e3:.3f} | {t_ref / t:.2f}x |")
            print(lines[-1], flush=True)
    return lines


def bench_prefill(ops, chunks: list[tuple[int, int]], repeat: int) -> list[str]:
    gen = torch.Generator().manual_seed(2)
    lines = ["| chunk | cached prefix | paged_prefill_attention ms | reference ms | speed-up |", "|---|---|---|---|---|"]
    for chunk, prefix in chunks:
        ctx = chunk + prefix
        blocks = -(-ctx // PAGE)
        k_cache = torch.randn(blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen)
        v_cache = torch.randn(blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen)
        tables = torch.randperm(blocks, generator=gen).to(torch.int32).view(1, blocks)
        q = torch.randn(chunk, HEADS, HEAD_DIM, generator=gen)
        cu, lens = torch.tensor([0, chunk], dtype=torch.int32), torch.tensor([ctx], dtype=torch.int32)
        pos = torch.arange(prefix, ctx)
        slots = tables[0].long()[pos // PAGE] * PAGE + pos % PAGE
        k, v = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
        t = best_of(lambda: ops.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, HEAD_DIM ** -0.5),
                    repeat)
        t_ref = best_of(lambda: reference.prefill_attention(q, k, v, cu, k_cache, v_cache, tables, lens,
                                                            HEAD_DIM ** -0.5), repeat)
        lines.append(f"| {chunk} | {prefix} | {t * 1e3:.2f} | {t_ref * 1e3:.2f} | {t_ref / t:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def bench_row_ops(ops, rows: list[int], repeat: int) -> list[str]:
    gen = torch.Generator().manual_seed(3)
    lines = ["| M | op | ours µs | torch µs | speed-up |", "|---|---|---|---|---|"]
    w = torch.randn(HIDDEN, generator=gen)
    for m in rows:
        x, gate_up = torch.randn(m, HIDDEN, generator=gen), torch.randn(m, 2 * FFN, generator=gen)
        qkv = torch.randn(m, 960, generator=gen)
        q, k = qkv[:, :HIDDEN].view(m, HEADS, HEAD_DIM), qkv[:, HIDDEN:768].view(m, KV_HEADS, HEAD_DIM)
        angles = torch.randn(m, HEAD_DIM // 2, generator=gen)
        cos, sin = angles.cos(), angles.sin()
        pairs = [("rms_norm", lambda: ops.rms_norm(x, w, 1e-5), lambda: reference.rms_norm(x, w, 1e-5)),
                 ("silu_and_mul", lambda: ops.silu_and_mul(gate_up), lambda: reference.silu_and_mul(gate_up)),
                 ("rotary", lambda: ops.rotary(q, k, cos, sin), lambda: reference.rotary(q, k, cos, sin))]
        for name, ours_fn, torch_fn in pairs:
            t, t_ref = best_of(ours_fn, 10 * repeat), best_of(torch_fn, 10 * repeat)
            lines.append(f"| {m} | {name} | {t * 1e6:.1f} | {t_ref * 1e6:.1f} | {t_ref / t:.2f}x |")
            print(lines[-1], flush=True)
    return lines


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    wait = os.environ.get("OMP_WAIT_POLICY")
    return (f"CPU {model} · avx2 {'yes' if 'avx2' in flags else 'no'} · avx512 {', '.join(avx512) or 'no'} · "
            f"{torch.get_num_threads()} threads{f' (OMP_WAIT_POLICY={wait})' if wait else ''} · "
            f"torch {torch.__version__}")


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8,16,32,64,128,512")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="2 layers, few rows: a smoke run of the script itself")
    p.add_argument("--sections", default="linears,attention,prefill,row_ops")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_kernels.md"))
    args = p.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    header, load_start = machine(), load_average()
    start = time.perf_counter()
    ops = cpu_ops.load()
    load_s = time.perf_counter() - start
    rows = [1, 8] if args.quick else [int(r) for r in args.rows.split(",")]
    sections = args.sections.split(",")
    text = ""
    if "linears" in sections:
        linears = bench_linears(ops, rows, args.repeat, 2 if args.quick else LAYERS)
        text += (f"## Projections and head (SmolLM2-135M shapes, {2 if args.quick else LAYERS} layers x 4 "
                 f"projections, distinct weights; best of {args.repeat})\n\n" + "\n".join(linears) + "\n\n")
    if "attention" in sections:
        attention = bench_attention(ops, [1, 4] if args.quick else [int(b) for b in args.batches.split(",")],
                                    [128] if args.quick else [int(c) for c in args.contexts.split(",")], args.repeat)
        text += (f"## Paged decode attention ({HEADS} heads / {KV_HEADS} KV heads, head_dim {HEAD_DIM}, page {PAGE}, "
                 f"one layer; best of {args.repeat})\n\n" + "\n".join(attention) + "\n\n")
    if "prefill" in sections:
        prefill = bench_prefill(ops, [(128, 0)] if args.quick else [(128, 0), (512, 0), (128, 384)], args.repeat)
        text += (f"## Paged prefill attention (one sequence, same heads and page; best of {args.repeat})\n\n"
                 + "\n".join(prefill) + "\n\n")
    if "row_ops" in sections:
        row_ops = bench_row_ops(ops, [1, 8] if args.quick else [1, 32, 512], args.repeat)
        text += (f"## Row ops (rms_norm over {HIDDEN}, silu_and_mul of 2 x {FFN}, rotary of {HEADS} + {KV_HEADS} "
                 f"heads of {HEAD_DIM}; best of {10 * args.repeat})\n\n" + "\n".join(row_ops) + "\n\n")
    text = (f"# CPU kernels: quantized linears, paged attention and row ops against torch\n\n"
            f"{datetime.date.today()} · {header} · extension loaded in {load_s:.1f} s · load average "
            f"{load_start} at the start, {load_average()} at the end (the machine is shared)\n\n" + text)
    text += f"Command: `{' '.join(['.venv/bin/python benchmarks/cpu_kernels_bench.py', *sys.argv[1:]])}`\n"
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
