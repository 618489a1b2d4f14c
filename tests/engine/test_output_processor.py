"""The front end's half of a step (:class:`OutputProcessor`), fed the engine core's messages by hand.

Specified: ``process`` takes one message or several (a front end that fell behind reads every message
waiting and hands them over at once). Several messages make one output per request that progressed,
holding all of their tokens and text, exactly what processing them one by one would have streamed in
total; a request that one message finishes gets nothing from the later ones, and the samples that a
stop string finished are reported once. With a stream interval of N, an unfinished request is reported when
its first token arrives and then whenever N tokens have not been reported, its outputs together holding
every token and all the text; a stop string still ends it on the token that completes it.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llmserve.engine.messages import EngineCoreOutputs, EngineCoreRequest, SampleOutput
from llmserve.engine.output_processor import OutputKind, OutputProcessor
from llmserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def processor_with(tokenizer, *params: SamplingParams, stream_interval: int = 1) -> OutputProcessor:
    processor = OutputProcessor(tokenizer, stream_interval)
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=False)
    for i, p in enumerate(params):
        request = EngineCoreRequest(f"r{i}", prompt, p, p.max_tokens, None, 0.0)
        processor.add(processor.make_state(None, request, OutputKind.DELTA))
    return processor


def step(*samples: tuple[str, int, str | None]) -> EngineCoreOutputs:
    """One core message: (request id, new token, finish reason) per sample."""
    return EngineCoreOutputs(samples=[SampleOutput(rid, 0, [token], finish_reason=finish)
                                      for rid, token, finish in samples], num_scheduled_tokens=len(samples))


def streamed(processor: OutputProcessor, *messages: EngineCoreOutputs) -> dict[str, tuple[list[int], str, str | None]]:
    """Per request: every token id and text its outputs held, and its last finish reason."""
    result: dict[str, tuple[list[int], str, str | None]] = {}
    outputs, _ = processor.process(*messages)
    for output in outputs:
        tokens, text, _ = result.get(output.request_id, ([], "", None))
        c = output.outputs[0]
        result[output.request_id] = (tokens + c.token_ids, text + c.text, c.finish_reason)
    return result


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_several_messages_make_one_output_per_request_with_what_each_would_have_streamed(tokenizer):
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b = token_ids(tokenizer, " the quick brown fox")[:3], token_ids(tokenizer, " hello world again")[:3]
    messages = [step(("r0", a[0], None), ("r1", b[0], None)), step(("r0", a[1], None), ("r1", b[1], None)),
                step(("r0", a[2], "length"))]
    one_by_one = processor_with(tokenizer, params, params)
    separately: dict[str, tuple[list[int], str]] = {}
    for message in messages:
        for rid, (tokens, text, _) in streamed(one_by_one, message).items():
            before = separately.get(rid, ([], ""))
            separately[rid] = (before[0] + tokens, before[1] + text)

    together = processor_with(tokenizer, params, params)
    outputs, stopped = together.process(*messages[:2])
    assert [o.request_id for o in outputs] == ["r0", "r1"] and not stopped
    assert [o.outputs[0].token_ids for o in outputs] == [a[:2], b[:2]]
    rest = streamed(together, messages[2])
    assert rest["r0"][2] == "length" and "r1" not in rest
    assert outputs[0].outputs[0].text + rest["r0"][1] == separately["r0"][1]
    assert outputs[1].outputs[0].text == separately["r1"][1]
    assert "r0" not in together.requests and together.num_generation_tokens_total == 5


def test_a_request_finished_by_one_message_takes_nothing_from_the_next(tokenizer):
    stop = SamplingParams(max_tokens=8, ignore_eos=True, stop=["fox"])
    ids = token_ids(tokenizer, " the fox jumps")
    processor = processor_with(tokenizer, stop)
    outputs, stopped = processor.process(*(step(("r0", t, None)) for t in ids))
    assert stopped == [("r0", 0)]             # the core is told once
    [output] = outputs
    assert output.finished and output.outputs[0].finish_reason == "stop" and output.outputs[0].stop_reason == "fox"
    assert "fox" not in output.outputs[0].text and "jumps" not in output.outputs[0].text
    assert output.outputs[0].token_ids == ids[:len(output.outputs[0].token_ids)]
    assert len(output.outputs[0].token_ids) < len(ids)


def reports(tokenizer, ids: list[int], kind: OutputKind, stream_interval: int, stop: list[str] | None = None
            ) -> tuple[list[int], list[int], str]:
    """Feeds ``ids`` one step each (the last finishing on length) to one request; the 1-based tokens after which
    it was reported, and the tokens and text its outputs held."""
    processor = OutputProcessor(tokenizer, stream_interval)
    params = SamplingParams(max_tokens=len(ids), ignore_eos=True, stop=stop)
    request = EngineCoreRequest("r0", token_ids(tokenizer, "Once upon a time"), params, len(ids), None, 0.0)
    processor.add(processor.make_state(None, request, kind))
    reported, tokens, text = [], [], ""
    for i, token in enumerate(ids):
        outputs, _ = processor.process(step(("r0", token, "length" if i == len(ids) - 1 else None)))
        if outputs:
            reported.append(i + 1)
            c = outputs[0].outputs[0]
            tokens, text = (tokens + c.token_ids, text + c.text) if kind is OutputKind.DELTA else (c.token_ids, c.text)
            if outputs[0].finished:
                break
    return reported, tokens, text


@pytest.mark.parametrize("kind", [OutputKind.DELTA, OutputKind.CUMULATIVE])
def test_a_stream_interval_reports_the_first_token_then_every_n_tokens_and_the_last(tokenizer, kind):
    ids = token_ids(tokenizer, " the quick brown fox jumps over the lazy dog and runs")[:8]
    every = reports(tokenizer, ids, kind, 1)
    assert every[0] == list(range(1, 9))
    reported, tokens, text = reports(tokenizer, ids, kind, 3)
    assert reported == [1, 4, 7, 8]
    assert (tokens, text) == (ids, every[2])


def test_a_stream_interval_still_stops_on_the_token_that_completes_a_stop_string(tokenizer):
    ids = token_ids(tokenizer, " the quick brown fox jumps over")
    every = reports(tokenizer, ids, OutputKind.DELTA, 1, stop=["fox"])
    reported, tokens, text = reports(tokenizer, ids, OutputKind.DELTA, 8, stop=["fox"])
    assert reported == [1, every[0][-1]] and every[0][-1] < len(ids)
    assert (tokens, text) == (every[1], every[2]) and text.endswith("brown ")


def test_a_stream_interval_reports_a_sample_that_finished_while_the_others_go_on(tokenizer):
    ids = token_ids(tokenizer, " the quick brown fox jumps over")[:4]
    processor = processor_with(tokenizer, SamplingParams(n=2, max_tokens=4, ignore_eos=True), stream_interval=8)

    def both(i: int, first_finish: str | None) -> EngineCoreOutputs:
        return EngineCoreOutputs(samples=[SampleOutput("r0", 0, [ids[i]], finish_reason=first_finish),
                                          SampleOutput("r0", 1, [ids[i]])], num_scheduled_tokens=2)

    first, _ = processor.process(both(0, None))
    middle, _ = processor.process(both(1, None))
    finished, _ = processor.process(both(2, "stop"))
    assert len(first) == 1 and not middle   # the first tokens at once, then nothing due
    assert [c.finish_reason for c in finished[0].outputs] == ["stop", None] and not finished[0].finished
    assert [c.token_ids for c in finished[0].outputs] == [ids[1:3], ids[1:3]]


def test_a_stream_interval_below_one_is_refused():
    from llmserve.config import EngineConfig

    with pytest.raises(ValueError, match="--stream-interval must be >= 1, got 0"):
        EngineConfig(model="m", stream_interval=0)
