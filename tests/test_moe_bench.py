"""benchmarks/moe_bench.py end to end on tiny shapes: three models built from one shape, each decoded, the table
and both ratios written."""
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_moe_bench_reports_the_moe_against_both_dense_models(tmp_path):
    out = tmp_path / "moe.md"
    subprocess.run([sys.executable, "benchmarks/moe_bench.py", "--layers", "2", "--hidden", "64", "--heads", "4",
                    "--kv-heads", "2", "--experts", "4", "--top-k", "2", "--expert-width", "64", "--streams", "1,2",
                    "--output-len", "4", "--prompt-len", "8", "--enforce-eager", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| ([^|]+?) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$",
                                                             text, re.M)}
    moe, active, total = rows["MoE: 4 experts, top-2"], rows["dense, same active parameters"], \
        rows["dense, same total parameters"]
    assert moe[0] == total[0] and moe[1] == active[1]  # parameters counted as promised (M, rounded)
    assert all(float(rate) > 0 for row in (moe, active, total) for rate in row[2:])
    assert re.search(r"^\| MoE / dense, same active parameters \| [\d.]+x \| [\d.]+x \|$", text, re.M)
    assert re.search(r"^\| MoE / dense, same total parameters \| [\d.]+x \| [\d.]+x \|$", text, re.M)
