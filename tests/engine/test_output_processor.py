"""The front end's half of a step (:class:`OutputProcessor`), fed the engine core's messages by hand.

Specified: ``process`` takes one message or several (a front end that fell behind reads every message
waiting and hands them over at once). Several messages make one output per request that progressed,
holding all of their tokens and text, exactly what processing them one by one would have streamed in
total; a request that one message finishes gets nothing from the later ones, and the samples that a
stop string finished are reported once.
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


def processor_with(tokenizer, *params: SamplingParams) -> OutputProcessor:
    processor = OutputProcessor(tokenizer)
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
