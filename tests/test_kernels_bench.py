"""kernels_bench.py runs end to end on tiny shapes (on CPU: the Triton kernels in the interpreter), so the script
is ready for the GPU numbers it exists to take."""
import pytest
import torch

from benchmarks import kernels_bench

# on CPU the Triton backend runs in the interpreter (conftest sets TRITON_INTERPRET); on a GPU natively, in bf16
# (the flash SDPA baseline has no float32 kernel)
DEVICE, DTYPE = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quick_run_writes_all_three_tables(tmp_path, backend):
    pytest.importorskip("triton")
    out = tmp_path / "k.md"
    assert kernels_bench.main(["--device", DEVICE, "--backend", backend, "--dtype", DTYPE, "--quick",
                               "--repeat", "1", "--heads", "4,2,64", "--out", str(out)]) == 0
    text = out.read_text()
    for section in ("## Decode attention", "## Prefill attention", "## Fused ops"):
        assert section in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 + 2  # decode: 2 batches x 2 contexts; prefill: 2 lengths
    assert text.count("x |") == 4 + 2 + 4
