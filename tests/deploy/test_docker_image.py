"""Builds the CPU image and runs it once, where a Docker daemon runs and the base image is already
present (the build fetches Python packages, not the base image): the container runs as its non-root user,
serves the demo model with ``docker run IMAGE`` alone, /health answers 200 on the published port, the
HEALTHCHECK turns healthy, the API key comes from ``-e LLMSERVE_API_KEY``, and ``docker stop`` (SIGTERM)
ends it with status 0. Skips, saying why, anywhere else."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import httpx
import pytest

from tests.deploy.tools import DOCKERFILES, REPO, instructions

BUILD_TIMEOUT = 3600


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def base_image() -> str:
    (default,) = [rest.split("=", 1)[1] for keyword, rest in instructions(DOCKERFILES["cpu"])
                  if keyword == "ARG" and rest.startswith("PYTHON_IMAGE=")]
    return default


@pytest.fixture(scope="module")
def image():
    if shutil.which("docker") is None:
        pytest.skip("no docker command on this machine")
    info = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    if info.returncode != 0:
        pytest.skip(f"no Docker daemon answers: {(info.stderr or info.stdout).strip().splitlines()[-1]}")
    if docker("image", "inspect", base_image(), check=False).returncode != 0:
        pytest.skip(f"the base image {base_image()} is not present (docker pull {base_image()} first)")
    tag = f"llmserve-test:{uuid.uuid4().hex[:12]}"
    docker("build", "-f", str(DOCKERFILES["cpu"]), "-t", tag, str(REPO), timeout=BUILD_TIMEOUT)
    yield tag
    docker("image", "rm", "-f", tag, check=False)


def test_runs_as_the_non_root_user(image):
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "1001"


def test_serves_the_demo_model_and_turns_healthy(image):
    name = f"llmserve-test-{uuid.uuid4().hex[:12]}"
    docker("run", "-d", "--name", name, "-p", "127.0.0.1::8000", "-e", "LLMSERVE_API_KEY=k",
           "--health-interval", "2s", image, "--kv-cache-memory-bytes", "256MiB")
    try:
        port = json.loads(docker("inspect", name).stdout)[0]["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
        deadline = time.monotonic() + 600
        while True:
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            assert state["Running"], docker("logs", name).stdout + docker("logs", name).stderr
            if state["Health"]["Status"] == "healthy":
                break
            assert time.monotonic() < deadline, docker("logs", name).stderr
            time.sleep(2)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer k"}, timeout=10).status_code == 200
        docker("stop", "--time", "60", name, timeout=90)
        assert json.loads(docker("inspect", name).stdout)[0]["State"]["ExitCode"] == 0
    finally:
        docker("rm", "-f", name, check=False)
