"""Shared fixtures: tiny checkpoints of every family, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmserve import config as config_module
from llmserve.testing.checkpoints import write_checkpoint
from tests.entrypoints.openai.conftest import RunningServer
from tests.server_registry import Key, ServerRegistry

FAMILY_NAMES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma4", "gpt2", "cohere", "cohere2",
                "phi3", "phi3_longrope", "phi4_mini", "bloom", "falcon", "falcon_mqa", "falcon_rw", "mixtral", "qwen2_moe",
                "qwen3_moe", "deepseek_v2_lite", "deepseek_v2", "deepseek_v3", "gemma4_moe"]

# Tiny models: one thread is faster than two fighting over a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def auto_dtype_is_float32():
    """The suite compares with transformers in float32: ``--dtype auto`` resolves as on a CPU without native
    bfloat16, whatever this machine has (servers in subprocesses get ``--dtype float32``; the bfloat16 paths
    are tested with an explicit dtype)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config_module, "cpu_flags", lambda: frozenset())
        yield


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    """``checkpoint_dir(family)`` -> folder of a tiny random-weight checkpoint (cached per session)."""
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in cache:
            cache[family] = write_checkpoint(root / family, family=family, size="tiny", seed=0)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def llama_dir(checkpoint_dir) -> Path:
    return checkpoint_dir("llama")


@pytest.fixture(scope="session")
def server_registry(llama_dir, tmp_path_factory) -> ServerRegistry:
    """The servers test modules share, for the whole session."""
    registry = ServerRegistry(llama_dir, tmp_path_factory.mktemp("shared-server-logs"))
    yield registry
    registry.stop_all()


@pytest.fixture(scope="module")
def shared_server(server_registry):
    """``shared_server(*flags, model=None)`` -> a server of the tiny llama (or ``model``) with those flags,
    started once and reused by every module asking for the same ones (held until this module ends): for
    tests that only send requests and read their own answers (see tests/server_registry.py)."""
    held: list[Key] = []

    def get(*flags: str, model: Path | None = None) -> RunningServer:
        key = server_registry.key(*flags, model=model)
        server = server_registry.acquire(key)
        held.append(key)
        return server

    yield get
    for key in held:
        server_registry.release(key)
