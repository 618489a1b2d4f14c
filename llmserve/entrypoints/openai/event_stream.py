"""A streaming response: the server-sent events of one HTTP request's engine requests.

:class:`EventStream` turns each engine output into its events as it arrives, synchronously. Served by this
project's HTTP protocol, :class:`SSEResponse` hands it the outputs straight from the engine's output handler
and writes the events to the connection there and then (:class:`~llmserve.entrypoints.openai.http_protocol.BodyWriter`):
the response's own task wakes only when the stream ends, times out or the client leaves. Under another ASGI
server (or an in-process test client) a task reads the streams and sends each event down the ``send`` chain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmserve.engine.async_engine import EngineDeadError, ShutdownError
from llmserve.engine.output_processor import AnyRequestOutput
from llmserve.engine.output_stream import OutputStream, StreamItem
from llmserve.entrypoints.openai.http_protocol import BODY_WRITER
from llmserve.entrypoints.openai.serving_base import (DeltaMerger, OpenAIServing, SSEFraming, Submitted,
                                                      log_failed, log_finished, unavailable_code,
                                                      wait_disconnect)
from llmserve.outputs import RequestOutput

logger = logging.getLogger("llmserve.api")

Render = Callable[[int, RequestOutput], list[dict]]
Finish = Callable[[list[RequestOutput]], list[dict]]


class EventStream:
    """Each output rendered to chunks (``render(prompt index, output)``); once every request has finished,
    ``finish``'s chunks and the closing event. A failed request, an exception put on a stream, a render
    that raises or the deadline passing ends the stream with an error event, then the closing one.
    ``prefix`` chunks go first (the Responses API's ``response.created``)."""

    def __init__(self, submitted: Submitted, render: Render, finish: Finish, framing: SSEFraming | None = None,
                 prefix: Sequence[dict] = ()) -> None:
        self.submitted = submitted
        self.render = render
        self.finish = finish
        self.framing = framing or SSEFraming()
        self.prefix = prefix
        self.mergers = [DeltaMerger() for _ in submitted.streams]
        self.unfinished = len(submitted.streams)
        self.done = False

    def start(self) -> bytes:
        return b"".join(self.framing.event(chunk) for chunk in self.prefix)

    def feed(self, index: int, item: StreamItem) -> bytes:
        """The events for prompt ``index``'s next item (nothing once the stream is done)."""
        if self.done:
            return b""
        log_id = self.submitted.log_id
        if isinstance(item, BaseException):
            log_failed(log_id, f"failed: {item}")
            if isinstance(item, (EngineDeadError, ShutdownError)):
                return self._fail(503, str(item), unavailable_code(item))
            return self._fail(500, f"internal error ({type(item).__name__})", "engine_error")
        if item.error is not None:
            log_failed(log_id, f"failed: {item.error}")
            return self._fail(500, f"the engine failed on this request: {item.error}", "engine_error")
        self.mergers[index].add(item)
        try:
            events = [self.framing.event(chunk) for chunk in self.render(index, item)]
            if item.finished:
                self.unfinished -= 1
                if self.unfinished == 0:
                    events.extend(self._end())
        except Exception as exc:   # a bug in rendering: this response ends, the server goes on
            logger.exception("rendering request %s's events failed", log_id)
            return self._fail(500, f"internal error ({type(exc).__name__})", "internal_error")
        return b"".join(events)

    def timed_out(self, timeout: float | None) -> bytes:
        log_failed(self.submitted.log_id, f"aborted: no result within --request-timeout ({timeout} s)")
        return self._fail(504, f"the request did not finish within --request-timeout ({timeout} s)", "timeout")

    def disconnected(self) -> None:
        self.done = True
        log_failed(self.submitted.log_id, "aborted: the client disconnected")

    def _end(self) -> list[bytes]:
        self.done = True
        merged = [merger.merged() for merger in self.mergers]
        for output in merged:
            log_finished(self.submitted.log_id, output)
        return [self.framing.event(chunk) for chunk in self.finish(merged)] + self.framing.closing()

    def _fail(self, status: int, message: str, code: str) -> bytes:
        self.done = True
        return self.framing.error(status, message, code) + b"".join(self.framing.closing())


class SSEResponse(Response):
    """``text/event-stream`` of an :class:`EventStream`; the requests not finished when it ends (client gone,
    deadline, error) are aborted."""

    media_type = "text/event-stream"

    def __init__(self, serving: OpenAIServing, events: EventStream) -> None:
        self.serving = serving
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers()
        limits = serving.limits
        self.timeout = limits.request_timeout
        self.deadline = None if self.timeout is None else events.submitted.states[0].arrival_time + self.timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = scope.get("extensions", {}).get(BODY_WRITER)
        if writer is None:
            response = StreamingResponse(self._generate(), media_type=self.media_type)
            return await response(scope, receive, send)
        submitted = self.events.submitted
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def deliver(index: int, item: StreamItem) -> None:
            try:
                writer.write(self.events.feed(index, item))
            except Exception as exc:   # the response ends with it (the output handler aborts the request)
                if not done.done():
                    done.set_exception(exc)
                raise
            if self.events.done and not done.done():
                done.set_result(None)

        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            writer.write(self.events.start())
            for index, stream in enumerate(submitted.streams):
                stream.deliver_to(partial(deliver, index))
            if not self.events.done:
                timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                finished, _ = await asyncio.wait((done, watcher), timeout=timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                if not finished:
                    writer.write(self.events.timed_out(self.timeout))
                elif not done.done():
                    self.events.disconnected()
                    return
                elif done.exception() is not None:
                    raise done.exception()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.serving.abort_unfinished(submitted)

    async def _generate(self) -> AsyncIterator[bytes]:
        """The events read by this task, for a server without a body writer."""
        submitted = self.events.submitted
        reader = StreamReader(submitted.streams, self.deadline)
        try:
            if self.events.prefix:
                yield self.events.start()
            async for index, item in reader:
                data = self.events.timed_out(self.timeout) if item is TIMED_OUT else self.events.feed(index, item)
                if data:
                    yield data
                if self.events.done:
                    break
        except (GeneratorExit, asyncio.CancelledError):   # the response was dropped: the client left
            self.events.disconnected()
            raise
        finally:
            self.serving.abort_unfinished(submitted)
            reader.cancel()


TIMED_OUT = TimeoutError("--request-timeout")   # what :class:`StreamReader` yields when the deadline passed


class StreamReader:
    """A request's engine streams read as one: ``(prompt index, output)`` in the order outputs arrive, an
    exception a stream raised as its item, and :data:`TIMED_OUT` once ``deadline`` (``time.monotonic()``)
    has passed. The usual request (one prompt, no deadline) is read straight from its stream; only
    several prompts or a deadline take a reader task per stream and a queue, which would otherwise cost
    each streamed token two more task wake-ups."""

    def __init__(self, streams: list[OutputStream], deadline: float | None) -> None:
        self.streams = streams
        self.deadline = deadline
        self.tasks: list[asyncio.Task] = []

    def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        if len(self.streams) == 1 and self.deadline is None:
            return self._direct(self.streams[0])
        return self._fan_in()

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    @staticmethod
    async def _direct(stream: AsyncIterator[AnyRequestOutput]) -> AsyncIterator[tuple[int, Any]]:
        try:
            async for output in stream:
                yield 0, output
        except Exception as exc:   # noqa: BLE001 - forwarded to the response
            yield 0, exc

    async def _fan_in(self) -> AsyncIterator[tuple[int, Any]]:
        queue: asyncio.Queue = asyncio.Queue()
        done_marker = object()

        async def pump(index: int, stream: AsyncIterator[AnyRequestOutput]) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output))
            except BaseException as exc:   # noqa: BLE001 - forwarded to the response
                await queue.put((index, exc))
                return
            await queue.put((index, done_marker))

        self.tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(self.tasks)
        while remaining:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                index, item = await asyncio.wait_for(queue.get(), timeout)
            except asyncio.TimeoutError:
                yield 0, TIMED_OUT
                return
            if item is done_marker:
                remaining -= 1
            else:
                yield index, item
