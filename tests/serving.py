"""A live `cupaged serve` for tests: the server in a subprocess on 127.0.0.1, and small HTTP helpers. Every wait is
bounded in time and count. The server runs on $CUPAGED_TEST_DEVICE (cpu by default; cuda on a GPU machine)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-cupaged-test"
NAME = "tiny"
LIMIT = 60.0  # seconds any one wait in these tests may take
DEVICE = os.environ.get("CUPAGED_TEST_DEVICE", "cpu")


class ServerProcess:
    """`python -m cupaged.cli serve` on a free loopback port, up once /health answers."""

    def __init__(self, model: Path, log: Path, *args: str, step_delay: float = 0.0):
        path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        env = dict(os.environ, CUPAGED_CORE_STEP_DELAY=str(step_delay), PYTHONPATH=path)
        self.log_path = log
        cmd = [sys.executable, "-m", "cupaged.cli", "serve", "--model", str(model), "--device", DEVICE,
               "--host", "127.0.0.1", "--port", "0", "--served-model-name", NAME, *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + LIMIT
        self.url = None
        while self.url is None:
            found = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", self.output())
            if found:
                self.url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"the server did not start:\n{self.output()}")
            else:
                time.sleep(0.05)
        status, _ = http("GET", self.url + "/health")
        assert status == 200, self.output()

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"the server did not exit within {timeout}s of SIGTERM:\n{self.output()}")


def http(method: str, url: str, body: bytes | dict | None = None, key: str | None = None,
         timeout: float = 30.0) -> tuple[int, dict | str]:
    """(status, JSON body or text) of one request, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


def metrics(url: str, key: str | None = None) -> dict[str, float]:
    status, text = http("GET", url + "/metrics", key=key)
    assert status == 200
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
