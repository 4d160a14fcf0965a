"""Start the servers a benchmark compares, each on a free port of 127.0.0.1, and stop them afterwards.

tokenmill, the transformers static-batching baseline (hf_server.py), llama.cpp's C++ llama-server (given its
path) and llama-cpp-python's server (when that package is installed) all serve the same model file.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("tokenmill", "tokenmill-int4", "transformers", "llama-server", "llama-cpp-python")


@dataclass
class ServerSpec:
    system: str
    model: str = "default"
    dtype: str = "auto"
    max_concurrency: int = 32       # slots / batch size the server must allow
    context: int = 1024             # tokens per sequence the server must hold
    threads: int = 0                # 0: all cores
    llama_server: str | None = None  # path to the llama-server binary
    extra_args: tuple[str, ...] = ()  # more flags for tokenmill serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gguf(model: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from models.loading import resolve_model_path
    path = resolve_model_path(model)
    if path.suffix != ".gguf":
        raise ValueError(f"llama.cpp needs a .gguf model, got {path}")
    return path


def command(spec: ServerSpec, port: int) -> list[str]:
    threads = spec.threads or os.cpu_count() or 1
    if spec.system in ("tokenmill", "tokenmill-int4"):
        quantization = ["--quantization", "int4"] if spec.system == "tokenmill-int4" else []
        return [sys.executable, "-m", "server.cli", "serve", spec.model, "--port", str(port), "--dtype", spec.dtype,
                "--max-num-seqs", str(max(spec.max_concurrency, 1)), "--max-model-len", str(spec.context),
                "--served-model-name", "bench", "--log-level", "warning", *quantization, *spec.extra_args]
    if spec.system == "transformers":
        return [sys.executable, str(ROOT / "benchmarks" / "hf_server.py"), spec.model, "--port", str(port),
                "--dtype", spec.dtype, "--max-batch", str(spec.max_concurrency)]
    if spec.system == "llama-server":
        if not spec.llama_server:
            raise ValueError("llama-server needs --llama-server PATH (make llama-server builds one)")
        slots = max(spec.max_concurrency, 1)
        return [spec.llama_server, "-m", str(_gguf(spec.model)), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(slots), "-c", str(slots * spec.context), "-t", str(threads), "-tb", str(threads),
                "--cont-batching", "--no-webui"]
    if spec.system == "llama-cpp-python":
        # without --interrupt_requests False, 7 of 8 concurrent streams come back empty
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(_gguf(spec.model)), "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(spec.context), "--n_threads", str(threads),
                "--interrupt_requests", "False"]
    raise ValueError(f"unknown system {spec.system!r}; choose from {SYSTEMS}")


class LaunchedServer:
    def __init__(self, spec: ServerSpec, startup_timeout: float = 300.0):
        self.spec = spec
        port = _free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{spec.system}-", suffix=".log", delete=False)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(command(spec, port), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{spec.system} exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{spec.system} did not come up in {startup_timeout:.0f} s; log: {self.log.name}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "LaunchedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
