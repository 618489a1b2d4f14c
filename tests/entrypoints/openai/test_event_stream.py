"""A streaming response's events (:mod:`llmserve.entrypoints.openai.event_stream`).

:class:`EventStream`:

* Each output's rendered chunks as events, in order; once every prompt's request has finished, the
  ``finish`` chunks (given each prompt's merged output, in prompt order) and the closing ``[DONE]``.
  Nothing more after that.
* A request the engine failed, an exception on a stream (503 for a dead engine or a shutdown, 500
  otherwise), a render that raises and a passed deadline (504) each end the stream with OpenAI's error
  object as an event, then ``[DONE]``.
* The prefix chunks (the Responses API's ``response.created``) come first, numbered by its framing.

:class:`SSEResponse` under a server that offers a body writer (this project's HTTP protocol):

* The events are written when the output is put on the stream, before any task runs; the response's start
  and end go through ``send``, and the requests are aborted if unfinished when it ends.
* A client that leaves: nothing more is written or sent, the requests are aborted.
* ``--request-timeout``: the timeout event ends the stream.
* A write that fails raises from ``put`` (the output handler aborts that request) and ends the response with
  the error.

Without a body writer (another ASGI server) the same bytes go through ``send`` as body messages.

How that fallback reads its request's engine streams (:class:`StreamReader`):

* One prompt and no deadline: the stream's outputs as ``(0, output)`` in order; an exception the stream
  raises comes as the last item (the response turns it into an error event).
* Several prompts: each output tagged with its prompt's index, in the order they arrive.
* A deadline that passes before the streams end: :data:`TIMED_OUT` is the last item, for one prompt as
  for several.
* ``cancel`` stops the reader tasks of several prompts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from llmserve.engine.async_engine import EngineDeadError
from llmserve.engine.output_stream import OutputStream
from llmserve.entrypoints.openai.event_stream import TIMED_OUT, EventStream, SSEResponse, StreamReader
from llmserve.entrypoints.openai.http_protocol import BODY_WRITER
from llmserve.entrypoints.openai.serving_base import ServerLimits, Submitted
from llmserve.entrypoints.openai.serving_responses import ResponsesFraming
from llmserve.outputs import CompletionOutput, RequestOutput


def _output(text: str, finished: bool = False, error: str | None = None) -> RequestOutput:
    completion = CompletionOutput(0, text, [1], None, None, "stop" if finished else None)
    return RequestOutput("r", None, [7, 8], None, [completion], finished, error=error)


def _submitted(num_prompts: int = 1) -> Submitted:
    states = [SimpleNamespace(request_id=f"r-{i}", arrival_time=time.monotonic()) for i in range(num_prompts)]
    return Submitted("cmpl-1", "log-1", 0, states, [OutputStream() for _ in range(num_prompts)], "m")


def _render(index: int, output: RequestOutput) -> list[dict]:
    return [{"p": index, "text": output.outputs[0].text}]


def _finish(merged: list[RequestOutput]) -> list[dict]:
    return [{"merged": [m.outputs[0].text for m in merged]}]


def _events(data: bytes) -> list:
    return [json.loads(e[len("data: "):]) if e != "data: [DONE]" else "[DONE]"
            for e in data.decode().split("\n\n") if e]


def test_outputs_then_finish_then_done_and_nothing_after():
    events = EventStream(_submitted(2), _render, _finish)
    got = events.start() + events.feed(0, _output("a")) + events.feed(1, _output("b", finished=True))
    assert not events.done
    got += events.feed(0, _output("c", finished=True))
    assert events.done and events.feed(0, _output("late")) == b""
    assert _events(got) == [{"p": 0, "text": "a"}, {"p": 1, "text": "b"}, {"p": 0, "text": "c"},
                            {"merged": ["ac", "b"]}, "[DONE]"]


@pytest.mark.parametrize("item, code, message", [
    (_output("", error="boom"), "engine_error", "the engine failed on this request: boom"),
    (EngineDeadError("the engine loop died"), "engine_dead", "the engine loop died"),
    (RuntimeError("bug"), "engine_error", "internal error (RuntimeError)"),
])
def test_a_failure_ends_the_stream_with_an_error_event(item, code, message):
    events = EventStream(_submitted(), _render, _finish)
    got = _events(events.feed(0, _output("a")) + events.feed(0, item))
    assert got[0] == {"p": 0, "text": "a"} and got[-1] == "[DONE]" and len(got) == 3 and events.done
    assert got[1] == {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


def test_a_render_that_raises_ends_the_stream_with_an_internal_error():
    def render(index: int, output: RequestOutput) -> list[dict]:
        raise KeyError("oops")

    events = EventStream(_submitted(), render, _finish)
    got = _events(events.feed(0, _output("a")))
    assert got[0]["error"]["code"] == "internal_error" and got[1] == "[DONE]" and events.done


def test_a_passed_deadline_is_a_timeout_event():
    events = EventStream(_submitted(), _render, _finish)
    got = _events(events.timed_out(2.0))
    assert got[0]["error"]["code"] == "timeout" and "--request-timeout" in got[0]["error"]["message"]
    assert got[1] == "[DONE]" and events.done


def test_prefix_events_come_first_numbered_by_the_framing():
    events = EventStream(_submitted(), lambda i, o: [{"type": "delta"}], lambda m: [{"type": "done"}],
                         ResponsesFraming(), prefix=[{"type": "created"}, {"type": "in_progress"}])
    data = (events.start() + events.feed(0, _output("a", finished=True))).decode()
    blocks = [b for b in data.split("\n\n") if b]
    assert [json.loads(b.split("data: ", 1)[1])["sequence_number"] for b in blocks] == [0, 1, 2, 3]
    assert [b.split("\n")[0] for b in blocks] == ["event: created", "event: in_progress", "event: delta",
                                                  "event: done"]


class _Writer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _Client:
    """The ASGI side of a response: ``send`` records messages; ``receive`` returns a disconnect once told to."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def _serving(timeout: float | None = None) -> SimpleNamespace:
    aborted: list[str] = []
    return SimpleNamespace(limits=ServerLimits(request_timeout=timeout), aborted=aborted,
                           abort_unfinished=lambda submitted: aborted.extend(s.request_id for s in submitted.states))


def _scope(writer: _Writer | None) -> dict:
    return {"type": "http", "extensions": {BODY_WRITER: writer} if writer else {}}


async def _started(writer: _Writer, timeout: float | None = None
                   ) -> tuple[Submitted, _Client, SimpleNamespace, asyncio.Future]:
    """A response to one fresh stream, started (its task running) and waiting for outputs."""
    submitted, client, serving = _submitted(), _Client(), _serving(timeout)
    response = SSEResponse(serving, EventStream(submitted, _render, _finish))
    task = asyncio.ensure_future(response(_scope(writer), client.receive, client.send))
    await asyncio.sleep(0.01)
    return submitted, client, serving, task


def test_with_a_body_writer_events_are_written_as_outputs_are_put():
    async def run() -> tuple[list[dict], bytes, list[str]]:
        writer = _Writer()
        submitted, client, serving, task = await _started(writer)
        assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
        submitted.streams[0].put(_output("a"))
        assert _events(writer.data) == [{"p": 0, "text": "a"}]   # written in place, no task has run
        submitted.streams[0].put(_output("b", finished=True))
        await asyncio.wait_for(task, 1.0)
        return client.sent, writer.data, serving.aborted

    sent, data, aborted = asyncio.run(run())
    assert _events(data) == [{"p": 0, "text": "a"}, {"p": 0, "text": "b"}, {"merged": ["ab"]}, "[DONE]"]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False} and len(sent) == 2
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert aborted == ["r-0"]


def test_a_client_that_leaves_gets_nothing_more_and_its_requests_are_aborted():
    async def run() -> tuple[list[dict], bytes, list[str]]:
        writer = _Writer()
        submitted, client, serving, task = await _started(writer)
        submitted.streams[0].put(_output("a"))
        client.gone.set()
        await asyncio.wait_for(task, 1.0)
        submitted.streams[0].put(_output("b"))
        return client.sent, writer.data, serving.aborted

    sent, data, aborted = asyncio.run(run())
    assert _events(data) == [{"p": 0, "text": "a"}] and len(sent) == 1 and aborted == ["r-0"]


def test_the_request_timeout_ends_the_stream_with_a_timeout_event():
    async def run() -> tuple[list[dict], bytes]:
        writer = _Writer()
        _, client, _, task = await _started(writer, timeout=0.05)
        await asyncio.wait_for(task, 2.0)
        return client.sent, writer.data

    sent, data = asyncio.run(run())
    got = _events(data)
    assert got[0]["error"]["code"] == "timeout" and got[1] == "[DONE]" and sent[-1]["more_body"] is False


def test_a_write_that_fails_fails_the_put_and_ends_the_response_with_it():
    class BrokenWriter(_Writer):
        def write(self, data: bytes) -> None:
            if data:
                raise OSError("broken pipe")

    async def run() -> tuple[bool, list[str]]:
        submitted, client, serving, task = await _started(BrokenWriter())
        with pytest.raises(OSError):
            submitted.streams[0].put(_output("a"))
        with pytest.raises(OSError, match="broken pipe"):
            await asyncio.wait_for(task, 1.0)
        return len(client.sent) == 1, serving.aborted

    assert asyncio.run(run()) == (True, ["r-0"])


def test_without_a_body_writer_the_same_events_go_through_send():
    async def run() -> tuple[list[dict], list[str]]:
        submitted, client, serving = _submitted(), _Client(), _serving()
        submitted.streams[0].put(_output("a"))
        submitted.streams[0].put(_output("b", finished=True))
        response = SSEResponse(serving, EventStream(submitted, _render, _finish))
        await asyncio.wait_for(response(_scope(None), client.receive, client.send), 1.0)
        return client.sent, serving.aborted

    sent, aborted = asyncio.run(run())
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert _events(body) == [{"p": 0, "text": "a"}, {"p": 0, "text": "b"}, {"merged": ["ab"]}, "[DONE]"]
    assert sent[-1]["more_body"] is False and aborted == ["r-0"]


async def _stream(items: list, delay: float = 0.0, fail: BaseException | None = None) -> AsyncIterator:
    for item in items:
        await asyncio.sleep(delay)
        yield item
    if fail is not None:
        raise fail


async def _read(reader: StreamReader) -> list[tuple[int, object]]:
    return [pair async for pair in reader]


def test_one_stream_is_read_in_order_and_its_error_is_the_last_item():
    error = RuntimeError("engine died")
    got = asyncio.run(_read(StreamReader([_stream(["a", "b"], fail=error)], None)))
    assert got == [(0, "a"), (0, "b"), (0, error)]


def test_one_stream_without_a_deadline_starts_no_task():
    async def run() -> tuple[list, int]:
        before = len(asyncio.all_tasks())
        reader = StreamReader([_stream(["a"])], None)
        seen = []
        async for pair in reader:
            seen.append((pair, len(asyncio.all_tasks()) - before))
        return seen, len(reader.tasks)

    seen, num_tasks = asyncio.run(run())
    assert seen == [((0, "a"), 0)] and num_tasks == 0


def test_several_streams_are_tagged_by_prompt_in_arrival_order():
    async def run() -> list:
        return await _read(StreamReader([_stream(["slow"], delay=0.05), _stream(["fast"])], None))

    assert asyncio.run(run()) == [(1, "fast"), (0, "slow")]


@pytest.mark.parametrize("num_streams", [1, 2])
def test_a_passed_deadline_ends_the_read_with_timed_out(num_streams):
    async def run() -> list:
        streams = [_stream(["x", "y"], delay=0.2) for _ in range(num_streams)]
        return await _read(StreamReader(streams, time.monotonic() + 0.05))

    assert asyncio.run(run()) == [(0, TIMED_OUT)]


def test_cancel_stops_the_reader_tasks():
    async def run() -> bool:
        reader = StreamReader([_stream(["x"], delay=10.0), _stream(["y"], delay=10.0)], None)
        iterator = reader.__aiter__()
        pending = asyncio.ensure_future(iterator.__anext__())
        await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.sleep(0.01)
        pending.cancel()
        return len(reader.tasks) == 2 and all(task.done() for task in reader.tasks)

    assert asyncio.run(run())
