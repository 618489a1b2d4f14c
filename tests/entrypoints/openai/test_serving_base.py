"""What the streaming endpoints share (:mod:`llmserve.entrypoints.openai.serving_base`).

* An event is ``data: <JSON>\n\n``: compact JSON in UTF-8 (non-ASCII characters as they are), a NaN or
  infinite float as ``null``.

How a request's streamed outputs become its final one (:class:`DeltaMerger`):

* Each sample's texts, token ids and logprobs are joined in order; the finish reason, metrics and
  cumulative logprob are the last output's; prompt logprobs are the first ones sent.
* A pooling request's one output is its final output.
* The merger keeps only the latest output alive, not every one it was given.

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
import weakref
from collections.abc import AsyncIterator

import pytest

from llmserve.entrypoints.openai.serving_base import TIMED_OUT, DeltaMerger, StreamReader, sse
from llmserve.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob, RequestMetrics,
                              RequestOutput)


def test_event_bytes():
    chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": "Grüße ✓", "logprobs": None}], "usage": None}
    assert sse(chunk) == ('data: {"id":"cmpl-1","choices":[{"index":0,"text":"Grüße ✓","logprobs":null}],'
                          '"usage":null}\n\n').encode()   # UTF-8, not \\u escapes
    assert json.loads(sse(chunk)[len(b"data: "):]) == chunk
    assert sse("[DONE]") == b"data: [DONE]\n\n"


def test_a_non_finite_float_is_written_as_null():
    """json.dumps would write -Infinity, which is not JSON: strict clients could not parse the event."""
    assert json.loads(sse({"logprob": float("-inf"), "x": float("nan")})[len(b"data: "):]) == {"logprob": None, "x": None}


def _delta(texts: list[str], ids: list[list[int]], finish: str | None = None, logprobs: bool = False,
           prompt_logprobs: list | None = None, t: float = 1.0) -> RequestOutput:
    completions = [CompletionOutput(i, text, tokens, -float(len(tokens)) if logprobs else None,
                                    [{tok: Logprob(-1.0, 1, str(tok))} for tok in tokens] if logprobs else None,
                                    finish, "eos" if finish else None)
                   for i, (text, tokens) in enumerate(zip(texts, ids))]
    return RequestOutput("r", "p", [5, 6], prompt_logprobs, completions, finish is not None,
                         RequestMetrics(0.0, last_token_time=t), num_generated_tokens=len(ids[0]))


def test_deltas_of_two_samples_merge_into_the_whole_texts_and_tokens():
    merger = DeltaMerger()
    prompt = [None, {6: Logprob(-0.5, 1, "6")}]
    merger.add(_delta(["He", "Go"], [[1], [7]], logprobs=True, prompt_logprobs=prompt, t=1.0))
    merger.add(_delta(["llo", ""], [[2, 3], []], logprobs=True, t=2.0))
    merger.add(_delta(["", "od"], [[], [8]], finish="stop", logprobs=True, t=3.0))
    out = merger.merged()
    assert [c.text for c in out.outputs] == ["Hello", "Good"]
    assert [c.token_ids for c in out.outputs] == [[1, 2, 3], [7, 8]]
    assert [[list(p) for p in c.logprobs] for c in out.outputs] == [[[1], [2], [3]], [[7], [8]]]
    assert [(c.finish_reason, c.stop_reason, c.cumulative_logprob) for c in out.outputs] == [
        ("stop", "eos", -0.0), ("stop", "eos", -1.0)]
    assert out.prompt_logprobs is prompt and out.finished and out.metrics.last_token_time == 3.0


def test_merged_without_logprobs_has_none():
    merger = DeltaMerger()
    merger.add(_delta(["a"], [[1]]))
    merger.add(_delta(["b"], [[2]], finish="length"))
    out = merger.merged()
    assert out.outputs[0].logprobs is None and out.outputs[0].text == "ab" and out.prompt_logprobs is None


def test_a_pooling_output_is_its_own_final_output():
    merger = DeltaMerger()
    pooled = EmbeddingRequestOutput("e", "p", [1], EmbeddingOutput([0.5]), True, "stop", RequestMetrics(0.0))
    merger.add(pooled)
    assert merger.merged() is pooled


def test_the_merger_keeps_only_the_latest_output_alive():
    merger = DeltaMerger()
    output = _delta(["x"], [[1]], logprobs=True)
    ref = weakref.ref(output)
    merger.add(output)
    del output
    merger.add(_delta(["y"], [[2]], logprobs=True))
    assert ref() is None
    assert merger.merged().outputs[0].text == "xy"


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
