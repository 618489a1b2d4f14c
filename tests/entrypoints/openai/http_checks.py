"""What the HTTP tests check over and over: OpenAI's error object, the metrics, the queue's state."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from llmserve.benchmarks.reliability.server_probe import parse_metrics


def scrape(base_url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{base_url}/metrics").text)


def check_error(response: httpx.Response, status: int, param: str | None = "<any>", code: str | None = "<any>",
                secrets: tuple[str, ...] = ()) -> dict:
    """``response`` is OpenAI's error object with this status; returns its ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert isinstance(error["message"], str) and error["message"]
    if param != "<any>":
        assert error["param"] == param, error
    if code != "<any>":
        assert error["code"] == code, error
    message = error["message"]
    assert not re.search(r"0x[0-9a-fA-F]{4,}", message), message
    for leak in ("/tmp", "/work", "site-packages", "Traceback", 'File "', *secrets):
        assert leak not in message, message
    return error


async def wait_for_queue(base_url: str, running: int, waiting: int) -> None:
    """Poll /metrics until the server has this many requests running and waiting (10 s at most)."""
    for _ in range(500):
        metrics = scrape(base_url)
        if metrics["vllm:num_requests_running"] == running and metrics["vllm:num_requests_waiting"] == waiting:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"never {running} running and {waiting} waiting: {metrics}")
