"""What a benchmark result says about the machine it ran on."""
import platform
from pathlib import Path


def cpu_description() -> str:
    """The CPU's model name and the vector flags that decide which kernels are fast on it."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), platform.machine())
    family = [l.split(":", 1)[1].strip() for l in info if l.startswith(("cpu family", "model\t"))][:2]
    flags = set(next((l.split(":", 1)[1].split() for l in info if l.startswith("flags")), []))
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16"]
    shown = [f for f in wanted if f in flags]
    return (f"{name}" + (f" (family {family[0]} model {family[1]})" if len(family) == 2 else "") +
            f", flags {' '.join(shown) or 'none of ' + ' '.join(wanted)}")
