"""``--log-format json``: everything the server writes (its own lines, the engine core's, uvicorn's) is one
JSON object per line, and a request's log line carries its ``X-Request-Id`` as ``request_id``."""

from __future__ import annotations

import json

import httpx


def test_server_logs_are_json_lines_with_request_ids(start_server):
    server = start_server("--log-format", "json")
    response = httpx.post(f"{server.base_url}/v1/completions", headers={"X-Request-Id": "trace-42"},
                          json={"model": "tiny", "prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert response.status_code == 200
    server.stop()
    entries = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert any(e.get("request_id") == "trace-42" and "finished" in e["message"] for e in entries)
    assert any(e.get("process") == "engine-core" for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
