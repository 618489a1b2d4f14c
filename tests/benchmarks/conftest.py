"""A live server (tiny llama checkpoint, real subprocess) for the ``bench serve`` / ``bench sweep`` tests."""

from __future__ import annotations

import pytest

from tests.entrypoints.openai.conftest import RunningServer, launch


@pytest.fixture(scope="module")
def bench_server(llama_dir, tmp_path_factory) -> RunningServer:
    server = launch(llama_dir, log_dir=tmp_path_factory.mktemp("bench-server-logs"))
    yield server
    server.stop()
