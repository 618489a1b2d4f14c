"""``--request-read-timeout``: a client gets that long to send a whole request, head and body.

Against a server started with ``--request-read-timeout 1``:

* a body trickled one byte at a time, a head trickled the same way and a connection on which nothing is
  sent each get 408 with OpenAI's error object (naming the flag) about one second after their first
  byte (or the connection), and the connection closes; none of them reaches the engine (the prompt-token
  counter does not move), and the server logs no traceback;
* a client that sends its request in pieces but within the time is served, and so is a keep-alive
  connection that idles longer than the timeout between two requests (the deadline starts with a
  request's first byte, not with the connection).
"""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest

from tests.entrypoints.openai.http_checks import scrape

BODY = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 2}).encode()
HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n")


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("--request-read-timeout", "1")


def trickle(port: int, first: bytes, rest: bytes, interval: float) -> tuple[bytes, float]:
    """Send ``first``, then ``rest`` one byte per ``interval`` until the server answers; return the answer
    (read until the server closes) and the seconds from connecting to the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(first)
        for byte in rest:
            if select.select([sock], [], [], interval)[0]:
                break
            sock.sendall(bytes([byte]))
        select.select([sock], [], [], 10)
        elapsed = time.monotonic() - start
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, elapsed


@pytest.mark.parametrize("first, rest", [(HEAD, BODY), (b"", HEAD + BODY), (b"", b"")],
                         ids=["body-trickled", "head-trickled", "nothing-sent"])
def test_a_request_that_does_not_arrive_in_time_gets_408(srv, first, rest):
    prompts_before = scrape(srv.base_url)["vllm:prompt_tokens_total"]
    answer, elapsed = trickle(srv.port, first, rest, interval=0.25)
    status_line, _, rest_of_answer = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:200]
    assert b"connection: close" in rest_of_answer.lower()
    error = json.loads(rest_of_answer.partition(b"\r\n\r\n")[2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "--request-read-timeout" in error["message"]
    assert 0.9 < elapsed < 3.0
    assert scrape(srv.base_url)["vllm:prompt_tokens_total"] == prompts_before
    assert "Traceback" not in srv.log()


def test_requests_that_arrive_in_time_are_served(srv):
    answer, _ = trickle(srv.port, HEAD, BODY, interval=0.005)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    with httpx.Client(base_url=srv.base_url, timeout=30) as client:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
        time.sleep(1.5)   # idle on the kept-alive connection for longer than the timeout
        assert client.post("/v1/completions", json=body).status_code == 200


def test_the_timeout_must_be_positive():
    from llmserve.entrypoints.openai.api_server import build_parser
    from llmserve.entrypoints.openai.server_args import server_config_from_args

    with pytest.raises(ValueError, match="--request-read-timeout must be > 0"):
        server_config_from_args(build_parser().parse_args(["--request-read-timeout", "0"]))
