"""``--api-key`` defaults to ``$LLMSERVE_API_KEY`` (as vLLM's ``--api-key`` does to ``$VLLM_API_KEY``), so a
container or a Kubernetes Secret can hand the key over without putting it on the command line; the flag
wins over the variable, and an empty variable means no key."""

from __future__ import annotations

import pytest

from llmserve.entrypoints.openai.api_server import build_parser
from llmserve.entrypoints.openai.server_args import API_KEY_ENV, server_config_from_args


def api_key(argv: list[str]) -> str | None:
    return server_config_from_args(build_parser().parse_args(argv)).api_key


def test_the_variable_is_the_default(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key([]) == "from-env"


def test_the_flag_wins_over_the_variable(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key(["--api-key", "from-flag"]) == "from-flag"


@pytest.mark.parametrize("value", [None, ""])
def test_no_key_without_flag_or_with_an_empty_variable(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(API_KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(API_KEY_ENV, value)
    assert api_key([]) is None
