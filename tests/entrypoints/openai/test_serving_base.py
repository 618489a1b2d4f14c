"""What the streaming endpoints share (:mod:`llmserve.entrypoints.openai.serving_base`).

* An event is ``data: <JSON>\n\n`` with the JSON laid out as Python's ``json.dumps`` writes it (``", "``
  and ``": "`` between items, non-ASCII characters as they are), the bytes clients have always received.

How a streaming response reads its request's engine streams (:class:`StreamReader`):

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

import pytest

from llmserve.entrypoints.openai.serving_base import TIMED_OUT, StreamReader, sse


def test_event_bytes():
    chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": "Grüße ✓", "logprobs": None}], "usage": None}
    assert sse(chunk) == ('data: {"id":"cmpl-1","choices":[{"index":0,"text":"Grüße ✓","logprobs":null}],'
                          '"usage":null}\n\n').encode()   # UTF-8, not \\u escapes
    assert json.loads(sse(chunk)[len(b"data: "):]) == chunk
    assert sse("[DONE]") == b"data: [DONE]\n\n"


def test_a_non_finite_float_is_written_as_null():
    """json.dumps would write -Infinity, which is not JSON: strict clients could not parse the event."""
    assert json.loads(sse({"logprob": float("-inf"), "x": float("nan")})[len(b"data: "):]) == {"logprob": None, "x": None}


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
