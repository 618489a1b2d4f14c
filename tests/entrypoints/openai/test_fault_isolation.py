"""Faults: when the model fails on one request, that request gets a 500 (or an SSE error event) and
every other request completes normally; when the engine loop itself fails, /health turns 503 at once
and the process exits non-zero so a supervisor restarts it."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.entrypoints.openai.conftest import HERE
from tests.entrypoints.openai.fault_server import FORWARD_POISON, LOOP_POISON

WRAPPER = HERE / "fault_server.py"


def test_model_fault_fails_only_the_poisoned_request(start_server):
    srv = start_server(wrapper=WRAPPER)
    url = f"{srv.base_url}/v1/completions"
    good_body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    expected = httpx.post(url, json=good_body, timeout=30).json()["choices"][0]["text"]

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            good = [client.post(url, json=good_body) for _ in range(3)]
            bad = client.post(url, json={"model": "tiny", "prompt": [5, FORWARD_POISON], "max_tokens": 20})
            return await asyncio.gather(bad, *good)

    bad, *good = asyncio.run(run())
    assert bad.status_code == 500 and "injected model fault" in bad.json()["error"]["message"]
    assert [g.status_code for g in good] == [200, 200, 200]
    assert all(g.json()["choices"][0]["text"] == expected for g in good)
    with httpx.stream("POST", url, json={"model": "tiny", "prompt": [FORWARD_POISON], "max_tokens": 5,
                                         "stream": True}, timeout=30) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
    assert httpx.get(f"{srv.base_url}/health").status_code == 200
    assert httpx.post(url, json=good_body, timeout=30).json()["choices"][0]["text"] == expected


def test_engine_loop_fault_turns_health_503_and_exits_nonzero(start_server):
    srv = start_server(wrapper=WRAPPER)
    response = httpx.post(f"{srv.base_url}/v1/completions",
                          json={"model": "tiny", "prompt": [5, LOOP_POISON], "max_tokens": 5}, timeout=30)
    assert response.status_code in (500, 503) and "error" in response.json()
    deadline = time.monotonic() + 15
    health = None
    while srv.process.poll() is None and time.monotonic() < deadline:
        try:
            health = httpx.get(f"{srv.base_url}/health", timeout=1).status_code
            assert health == 503
        except httpx.HTTPError:
            pass   # already shutting down
        time.sleep(0.05)
    assert srv.process.wait(timeout=15) != 0
