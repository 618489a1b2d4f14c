"""``--request-read-timeout``: a client gets that long to send a whole request, head and body.

Against a server started with ``--request-read-timeout 1``:

* a body trickled one byte at a time, a head trickled the same way and a connection on which nothing is
  sent each get 408 with OpenAI's error object (naming the flag) about one second after their first
  byte (or the connection), and the connection closes, with a lingering close (the client may go on
  sending for a while without a reset); none of them reaches the engine (the prompt-token counter does
  not move), and the server logs no traceback;
* a client that sends its request in pieces but within the time is served, and so is a keep-alive
  connection that idles longer than the timeout between two requests (the deadline starts with a
  request's first byte, not with the connection).

The body writer a streaming response writes its events with (:class:`BodyWriter`):

* it frames what it writes as h11 would: chunked for an HTTP/1.1 client, as it is for HTTP/1.0 (whose
  response ends when the connection closes), and a real HTTP/1.0 client reads a whole stream that way;
* it writes nothing before the response has started, after it has ended, once the client has gone or
  while the connection is closing.
"""

from __future__ import annotations

import json
import select
import socket
import time

import h11
import httpx
import pytest

from llmserve.entrypoints.openai.http_protocol import BodyWriter
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


def test_the_answer_is_followed_by_a_lingering_close(srv):
    """After the 408 the server shuts its side and drains what the client still sends for a while, instead
    of closing with bytes in flight: a close answered by a reset can destroy the answer before the client
    reads it. A client that reads the answer to its end can go on sending without a broken pipe."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(HEAD.replace(str(len(BODY)).encode(), b"10000000") + b"{")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        for _ in range(5):
            sock.sendall(b"x" * 65536)   # BrokenPipeError / ConnectionResetError when the server has closed
            time.sleep(0.05)


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


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing


class _Cycle:
    """What a BodyWriter reads of uvicorn's request-response cycle, around a real h11 connection that has
    received a request of ``http_version`` and sent a streaming response's head."""

    def __init__(self, http_version: bytes) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.conn.receive_data(b"POST /v1/completions HTTP/" + http_version
                               + b"\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert isinstance(self.conn.next_event(), h11.Request)
        assert isinstance(self.conn.next_event(), h11.EndOfMessage)
        self.transport = _Transport()
        self.response_started = self.response_complete = self.disconnected = False

    def start(self) -> None:
        self.conn.send(h11.Response(status_code=200, headers=[("content-type", "text/event-stream")]))
        self.response_started = True


@pytest.mark.parametrize("http_version", [b"1.1", b"1.0"])
def test_the_body_writer_frames_chunks_as_h11_does(http_version):
    cycle, reference = _Cycle(http_version), _Cycle(http_version)
    writer = BodyWriter(cycle)
    writer.write(b"early ")
    assert cycle.transport.written == b""   # the response has not started
    cycle.start()
    reference.start()
    chunks = [b"data: ", b"", "é{}\n\n".encode() * 300, b"x"]
    for chunk in chunks:
        writer.write(chunk)
    assert cycle.transport.written == b"".join(reference.conn.send(h11.Data(data=c)) for c in chunks if c)
    assert cycle.transport.written.startswith(b"6\r\ndata: \r\n" if http_version == b"1.1" else b"data: ")
    cycle.conn.send(h11.EndOfMessage())   # h11 still ends the response


@pytest.mark.parametrize("state", ["response_complete", "disconnected", "closing"])
def test_the_body_writer_writes_nothing_once_the_response_is_over(state):
    cycle = _Cycle(b"1.1")
    cycle.start()
    if state == "closing":
        cycle.transport.closing = True
    else:
        setattr(cycle, state, True)
    BodyWriter(cycle).write(b"late")
    assert cycle.transport.written == b""


def test_an_http_1_0_client_reads_a_whole_stream(srv):
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 5, "stream": True,
                       "ignore_eos": True}).encode()
    head = (b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head_out, _, events = answer.partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head_out.lower()
    data = [e[len(b"data: "):] for e in events.split(b"\n\n") if e]
    assert data[-1] == b"[DONE]" and len(data) >= 2   # a step's tokens may share an event
    choices = [json.loads(d)["choices"][0] for d in data[:-1]]
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
