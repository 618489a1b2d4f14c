"""One request's outputs between the API server's output handler and their reader (:class:`OutputStream`).

* Iterated: the outputs in the order they were put; a finished output is the last one read.
* An exception put on the stream is raised to the reader and ends the iteration.
* A reader waiting for the next output is woken by ``put``.
* ``deliver_to``: the outputs already waiting go to the callback at once, in order; each later ``put``
  calls it in place, before ``put`` returns.
"""

from __future__ import annotations

import asyncio

import pytest

from llmserve.engine.output_stream import OutputStream
from llmserve.outputs import RequestOutput


def _output(name: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(name, None, [], None, [], finished)


async def _read(stream: OutputStream) -> list[str]:
    return [output.request_id async for output in stream]


def test_outputs_are_read_in_order_and_a_finished_one_is_the_last():
    stream = OutputStream()
    for name, finished in (("a", False), ("b", True), ("late", False)):
        stream.put(_output(name, finished))
    assert asyncio.run(_read(stream)) == ["a", "b"]


def test_an_exception_put_on_the_stream_is_raised_and_ends_it():
    async def run() -> tuple[list[str], list[str]]:
        stream = OutputStream()
        stream.put(_output("a"))
        stream.put(RuntimeError("engine died"))
        seen = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for output in stream:
                seen.append(output.request_id)
        return seen, await _read(stream)

    assert asyncio.run(run()) == (["a"], [])


def test_a_waiting_reader_is_woken_by_put():
    async def run() -> list[str]:
        stream = OutputStream()
        reader = asyncio.ensure_future(_read(stream))
        await asyncio.sleep(0.01)
        assert not reader.done()
        stream.put(_output("a"))
        await asyncio.sleep(0)
        stream.put(_output("b", finished=True))
        return await asyncio.wait_for(reader, 1.0)

    assert asyncio.run(run()) == ["a", "b"]


def test_deliver_to_hands_waiting_outputs_over_then_each_put_in_place():
    stream = OutputStream()
    stream.put(_output("a"))
    stream.put(_output("b"))
    got: list[str] = []
    stream.deliver_to(lambda item: got.append(item.request_id))
    assert got == ["a", "b"]
    stream.put(_output("c", finished=True))
    assert got == ["a", "b", "c"]
