"""Fixtures that run the real server in a subprocess on a free port (tiny llama checkpoint)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def launch(model: Path, *args: str, log_dir: Path, wrapper: Path | None = None, ready: bool = True,
           timeout: float = 60) -> RunningServer:
    """Start ``python -m llmserve.entrypoints.openai.api_server`` (or a test wrapper script that patches the
    engine, then calls its ``main``) and wait for /health to say 200."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    entry = [str(wrapper)] if wrapper else ["-m", "llmserve.entrypoints.openai.api_server"]
    cmd = [sys.executable, *entry, "--model", str(model), "--port", str(port), "--served-model-name", "tiny",
           "--kv-cache-memory-bytes", "16MiB", "--num-threads", "1", "--dtype", "float32", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    server = RunningServer(process, port, log_path)
    if not ready:
        return server
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()}")


@pytest.fixture(scope="module")
def start_server(llama_dir, tmp_path_factory):
    """``start_server(*flags, wrapper=None, ready=True, model=None)`` -> RunningServer (the tiny llama unless
    ``model`` names another checkpoint folder); every server is stopped at the end of its test module, so
the servers of one module at most are alive at a time (each is three processes: server, engine core,
chat-template renderer)."""
    started: list[RunningServer] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(*args: str, wrapper: Path | None = None, ready: bool = True, model: Path | None = None
              ) -> RunningServer:
        server = launch(model or llama_dir, *args, log_dir=log_dir, wrapper=wrapper, ready=ready)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def server(shared_server) -> RunningServer:
    """The default server (no API key, no limits), shared by every module that uses it: tests on it measure
    counters as differences and leave it idle."""
    return shared_server()
