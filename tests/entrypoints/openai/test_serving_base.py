"""What the streaming endpoints share (:mod:`llmserve.entrypoints.openai.serving_base`).

* An event is ``data: <JSON>\n\n``: compact JSON in UTF-8 (non-ASCII characters as they are), a NaN or
  infinite float as ``null``.

How a request's streamed outputs become its final one (:class:`DeltaMerger`):

* Each sample's texts, token ids and logprobs are joined in order; the finish reason, metrics and
  cumulative logprob are the last output's; prompt logprobs are the first ones sent.
* A pooling request's one output is its final output.
* The merger keeps only the latest output alive, not every one it was given.
"""

from __future__ import annotations

import json
import weakref

from llmserve.entrypoints.openai.serving_base import DeltaMerger, sse
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
