"""The images' entrypoint command run here, as the container runs it (without Docker): the server comes
up on the tiny checkpoint, the HEALTHCHECK script says unhealthy until /health is 200 and healthy after,
the API key comes from ``LLMSERVE_API_KEY`` (as the Kubernetes Secret passes it), and SIGTERM ends it
with exit status 0."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.deploy.tools import DOCKERFILES, REPO, entrypoint

spec = importlib.util.spec_from_file_location("healthcheck", REPO / "docker" / "healthcheck.py")
healthcheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(healthcheck)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_serves_with_the_key_from_the_environment(llama_dir, tmp_path):
    entry = entrypoint(DOCKERFILES["cpu"])
    assert entry[2] == "python"
    port = free_port()
    # docker run IMAGE --model ... --port ...; --host 127.0.0.1 keeps this test on loopback (the last --host wins)
    argv = [sys.executable, *entry[3:], "--model", str(llama_dir), "--port", str(port), "--host", "127.0.0.1",
            "--kv-cache-memory-bytes", "16MiB", "--num-threads", "1"]
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes("\0".join(["tini", "--", *argv]).encode())
    env = dict(os.environ, LLMSERVE_API_KEY="from-secret", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    log = tmp_path / "server.log"
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while healthcheck.main(cmdline) != 0:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        answer = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer from-secret"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["data"][0]["id"] == str(llama_dir)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
        assert healthcheck.main(cmdline) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
