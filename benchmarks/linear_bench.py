"""A decode step's projections on the CPU: nn.Linear (F.linear) against CPULinear (models/cpu_linear.py), and
the int4 kernel of quantization="int4" (models/quantize.py), run at every row count to find where it stops paying.

Every projection of every layer of the model's shape, each with its own random weights (so the weights stream
from memory as in a real step, not from cache), plus the output head; rows = the step's batch size.

    .venv/bin/python benchmarks/linear_bench.py [--model default] [--rows 1,2,4,8,16,32,64,96,128,256]

Writes benchmarks/results/cpu_linear.md. Each cell is the best of --repeat passes over all layers.
"""
import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.malloc_tuning import keep_freed_memory_mapped  # noqa: E402
from models import quantize  # noqa: E402
from models.cpu_linear import CPULinear  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402
from models.loading import load_config  # noqa: E402


def best_of(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--rows", default="1,2,4,8,16,32,64,96,128,256")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_linear.md"))
    args = p.parse_args()
    keep_freed_memory_mapped()
    cfg = load_config(args.model)
    with torch.device("meta"):
        layer = LlamaForCausalLM(cfg).layers[0]
    shapes = [(m.out_features, m.in_features) for m in layer.modules() if isinstance(m, nn.Linear)]
    plain = [[nn.Linear(k, n, bias=False) for n, k in shapes] for _ in range(cfg.num_layers)]
    plain[0].append(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))  # the head, once
    torch.set_grad_enabled(False)
    fast = [[CPULinear.sharing(lin) for lin in layer] for layer in plain]
    int4 = [[quantize.Int4Linear.quantizing(lin) for lin in layer[:4]] for layer in plain]
    quantize.INT4_MAX_ROWS = 1 << 30  # the int4 kernel at every row count
    table = ["| rows | projections: F.linear ms | CPULinear ms | speed-up | int4 kernel ms | vs CPULinear | "
             "head: F.linear ms | CPULinear ms | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for m in [int(r) for r in args.rows.split(",")]:
        inputs = {k: torch.randn(m, k) for k in {k for _, k in shapes}}
        cells = []
        for layers in (plain, fast, int4):
            cells.append(best_of(lambda: [lin(inputs[lin.in_features]) for layer in layers for lin in layer[:4]],
                                 args.repeat))
        for layers in (plain, fast):
            cells.append(best_of(lambda: layers[0][4](inputs[cfg.hidden_size]), args.repeat))
        lin, tr, i4, head_lin, head_tr = (c * 1e3 for c in cells)
        line = (f"| {m} | {lin:.1f} | {tr:.1f} | {lin / tr:.2f}x | {i4:.1f} | {tr / i4:.2f}x | {head_lin:.1f} | "
                f"{head_tr:.1f} | {head_lin / head_tr:.2f}x |")
        table.append(line)
        print(line, flush=True)
    text = (f"# Small-batch projections on CPU: F.linear vs CPULinear (float32) vs the int4 kernel\n\n"
            f"{datetime.date.today()} · {platform.machine()} · {torch.get_num_threads()} threads · torch "
            f"{torch.__version__} · model `{args.model}` shapes ({cfg.num_layers} layers x 4 projections, "
            f"distinct weights; best of {args.repeat})\n\n" + "\n".join(table) + "\n\n"
            f"Command: `.venv/bin/python benchmarks/linear_bench.py {' '.join(sys.argv[1:])}`\n")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
