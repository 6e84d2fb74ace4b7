"""Fixtures for the HTTP server: ``leaplm serve`` started as a subprocess on 127.0.0.1 and a free port.

``server`` (module scope): SmolLM2 (int8, the GGUF default) with ``--max-num-seqs 16``; the test gets a
``ServerProcess`` with ``url`` (``http://127.0.0.1:PORT``), ``api_key`` (None) and ``log()``. At the end the
server gets SIGTERM and must exit 0 (a graceful shutdown). ``start_server(*args)`` starts another one (e.g. with
``--api-key``); the test stops it with ``.stop()``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

READY = "leaplm serve: ready on "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``leaplm serve`` subprocess; its stdout + stderr go to a log file (``log()``)."""

    def __init__(self, model: Path, *args: str, api_key: str | None = None, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.logfile = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="leaplm-serve-", delete=False)
        if "--kv-cache-memory" not in args:   # the default (a quarter of free memory, reserved) is too much for CI
            args = ("--kv-cache-memory", "1GiB", *args)
        cmd = [sys.executable, "-m", "leaplm.cli", "serve", "--model", str(model), "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})

    def log(self) -> str:
        return Path(self.logfile.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> "ServerProcess":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"leaplm serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if READY in self.log():
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"leaplm serve not ready after {timeout:.0f}s:\n{self.log()[-4000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit status (killed after ``timeout``: -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(smollm_gguf):
    s = ServerProcess(smollm_gguf, "--max-num-seqs", "16").wait_ready()
    yield s
    code = s.stop()
    assert code == 0, f"leaplm serve exited with {code} after SIGTERM:\n{s.log()[-3000:]}"


@pytest.fixture
def start_server(smollm_gguf):
    started: list[ServerProcess] = []

    def start(*args: str, api_key: str | None = None, env: dict | None = None) -> ServerProcess:
        s = ServerProcess(smollm_gguf, *args, api_key=api_key, env=env).wait_ready()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
