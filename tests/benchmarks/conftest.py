"""A live server (tiny llama checkpoint, real subprocess) for the ``bench serve`` / ``bench sweep`` tests."""

from __future__ import annotations

import pytest

from tests.entrypoints.openai.conftest import RunningServer


@pytest.fixture(scope="module")
def bench_server(shared_server) -> RunningServer:
    """The default server the OpenAI-server tests share: a benchmark only reads its own requests' results."""
    return shared_server()
