"""The server keeps up with the engine: the same requests through `cupaged serve` (streamed, over loopback) and
offline through LLMEngine, in the same run (bench/bench_serve.py), on a tiny checkpoint on the CPU.

The bound: with the engine core in a process of its own, the server's core does the same work as the offline
engine, step for step; what the server adds (HTTP, detokenizing, the load generator's client) runs in other
processes. On this 2-core machine those share the cores with the core's process, so the ratio is not 1: it
measured 0.95-1.00 here (2026-12-02), against 0.56 when the engine ran in a thread of the server's interpreter.
0.75 leaves room for a noisy CI machine and still fails if the core waits on the front again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

ROOT = Path(__file__).resolve().parent.parent
BOUND = 0.75


def test_server_over_offline_on_the_cpu(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bench.bench_serve", "--model", str(checkpoints("qwen3-tiny")), "--device", "cpu",
           "-n", "96", "-c", "16", "--input-len", "64", "--output-len", "64", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failed"] == 0 and result["unfinished"] == 0, result
    assert result["server_over_offline"] >= BOUND, (result["output_tokens_per_s"],
                                                     result["offline_output_tokens_per_s"])
