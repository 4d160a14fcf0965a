"""A headless locust run with benchmarks/locustfile.py against the real server: exit 0, and the CSV holds the TTFT
and tokens/s rows next to the requests themselves."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _generated(server: RunningServer) -> float:
    for line in httpx.get(f"{server.base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith("tokenmill:generation_tokens_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no generation token counter")


def test_headless_locust_run_reports_ttft_and_tokens_per_second(tiny_checkpoint, tmp_path):
    server = RunningServer(str(tiny_checkpoint("llama")), "--served-model-name", "tiny", "--max-model-len", "512",
                           "--kv-cache-memory", "64MiB", "--dtype", "float32")
    try:
        before = _generated(server)
        env = {**os.environ, "TOKENMILL_MODEL": "tiny", "TOKENMILL_API_KEY": server.api_key,
               "TOKENMILL_MAX_TOKENS": "16"}
        run = subprocess.run(
            [str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "benchmarks" / "locustfile.py"),
             "--headless", "-u", "4", "-r", "4", "-t", "8s", "--host", server.base_url, "--csv",
             str(tmp_path / "run"), "--only-summary", "--stop-timeout", "10"],
            env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
        for key in (("POST", "/v1/chat/completions"), ("STREAM", "e2e"), ("TTFT", "first token"),
                    ("TOKENS_PER_S", "decode")):
            assert key in rows, sorted(rows)
            assert int(rows[key]["Request Count"]) > 0 and int(rows[key]["Failure Count"]) == 0
        requests = int(rows[("STREAM", "e2e")]["Request Count"])
        assert int(rows[("TTFT", "first token")]["Request Count"]) == requests
        # every answer is 16 tokens (EOS ignored), and the server generated at least that many
        assert float(rows[("STREAM", "e2e")]["Average Content Size"]) == 16
        assert _generated(server) - before >= 16 * requests
        assert float(rows[("TOKENS_PER_S", "decode")]["Median Response Time"]) > 0
    finally:
        server.stop()
