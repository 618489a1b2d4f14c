"""The server's HTTP/1.1 connection handling: uvicorn's h11 protocol with the answers and the deadline
an OpenAI-compatible server owes its clients.

* A request head h11 cannot parse gets OpenAI's error object (uvicorn sends plain text), and 431 when
  the head is over ``--max-header-bytes`` (what reaches h11 in pieces; a head that arrives whole is
  measured by :class:`~llmserve.entrypoints.openai.middleware.RequestLimits`). Such an answer (and a 408)
  ends with a lingering close, so that the client reads it even while it is still sending.
* ``--request-read-timeout``: a client gets that long to send a whole request, head and body, counted
  from its first byte (from the connection for the first request). uvicorn has no such bound: a client
  trickling one byte per second, or connecting and sending nothing, would hold its connection and the
  route waiting on its body forever. When the time is up the client gets 408 and the connection closes;
  a route already waiting for the body sees a disconnect, so nothing was submitted to the engine.
* Each request's scope carries a :class:`BodyWriter` under ``scope["extensions"][BODY_WRITER]``: a
  streaming response writes its events with it from the engine's output handler, synchronously, instead of
  waking a task per event to pass it down the middlewares' ``send`` chain (the response's start and end
  still go through that chain).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from llmserve.entrypoints.openai.errors import error_body

# h11 states of the client's side in which its request is still arriving
_RECEIVING = (h11.IDLE, h11.SEND_BODY)
BODY_WRITER = "llmserve.http.response.body_writer"
LINGER_S = 2.0   # how long an answered connection that is closing still drains what the client sends


class BodyWriter:
    """Writes body chunks of a response that has started and not ended straight to its connection, framed
    as h11 frames them: h11 frames the first chunk, which shows whether the connection is chunked (HTTP/1.1)
    or not (HTTP/1.0, where the body ends with the connection); later chunks are framed here, saving h11's
    per-event state checks. For responses without a Content-Length (a stream). Nothing is written once the
    client has gone or the response has ended. There is no waiting for a slow reader: what it has not read
    yet stays in the transport's buffer (a stream's events, at most its tokens' worth)."""

    __slots__ = ("cycle", "chunked")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle
        self.chunked: bool | None = None   # known after the first chunk

    def write(self, data: bytes) -> None:
        cycle = self.cycle
        if (not data or not cycle.response_started or cycle.response_complete or cycle.disconnected
                or cycle.transport.is_closing()):
            return
        if self.chunked is None:
            framed = cycle.conn.send(event=h11.Data(data=data))   # h11 (a keyword: not a pipe's send(obj))
            self.chunked = framed != data
        elif self.chunked:
            framed = b"%x\r\n%b\r\n" % (len(data), data)
        else:
            framed = data
        cycle.transport.write(framed)


class LLMServeH11Protocol(H11Protocol):
    read_timeout: float | None = None     # set by :func:`http_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._lingering = False
        self._arm_read_deadline()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return   # the connection is answered and closing: what else arrives is dropped
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_read_deadline()      # the first byte of the next request on this connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None:   # the request's task has been created, not yet run
            extensions = cycle.scope.setdefault("extensions", {})
            if BODY_WRITER not in extensions:
                extensions[BODY_WRITER] = BodyWriter(cycle)
        if self.conn.their_state not in _RECEIVING:
            self._disarm_read_deadline()   # the request is complete (or the connection is over)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def _arm_read_deadline(self) -> None:
        if self.read_timeout is not None:
            self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in _RECEIVING:
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        if self.cycle is not None:         # the route is waiting for the rest of the body: it sees a disconnect
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self._send_error(408, f"the request did not arrive within --request-read-timeout ({self.read_timeout:g} s)")

    def send_400_response(self, msg: str) -> None:
        pending, _ = self.conn.trailing_data
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and len(pending) > limit:
            self._send_error(431, f"request headers larger than {limit} bytes")
        else:
            self._send_error(400, "invalid HTTP request")

    def _send_error(self, status: int, message: str) -> None:
        """Answer with OpenAI's error object outside any request cycle (h11 may be mid-request or have
        seen none), then close the connection."""
        body = json.dumps(error_body(status, message)).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self._linger()

    def _linger(self) -> None:
        """Close after a lingering close: the write side is shut (the client reads the answer, then EOF) and
        what the client still sends is read and dropped until it closes or ``LINGER_S`` pass. Closing at once,
        with the client's bytes unread or still arriving, makes the kernel reset the connection, and a reset
        can destroy the answer in the client's buffer before it is read (nginx and Apache linger the same way)."""
        self._lingering = True
        self._disarm_read_deadline()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


def http_protocol(read_timeout: float | None) -> type[LLMServeH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to this server's read deadline."""
    return type("LLMServeH11Protocol", (LLMServeH11Protocol,), {"read_timeout": read_timeout})
