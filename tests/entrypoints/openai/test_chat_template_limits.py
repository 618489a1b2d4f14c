"""A chat template that overruns its memory (``--chat-template`` allocating 10 GB) makes a chat request a
400 naming ``messages``; the server goes on serving completions and /health (the bounds themselves:
tests/entrypoints/test_chat_template_renderer.py)."""

from __future__ import annotations

import httpx

from tests.entrypoints.openai.http_checks import check_error
from tests.entrypoints.test_chat_template_renderer import CONVERSATION, TEN_GIGABYTES


def test_a_malicious_template_over_http_is_a_400_and_the_server_goes_on(start_server, tmp_path):
    path = tmp_path / "bomb.jinja"
    path.write_text(TEN_GIGABYTES)
    srv = start_server("--chat-template", str(path))
    body = {"model": "tiny", "messages": CONVERSATION, "max_tokens": 2}
    error = check_error(httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=60), 400, "messages")
    assert "MiB" in error["message"]
    completion = httpx.post(f"{srv.base_url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                            timeout=60)
    assert completion.status_code == 200
    assert httpx.get(f"{srv.base_url}/health").status_code == 200
