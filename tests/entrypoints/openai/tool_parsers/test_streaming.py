"""Streamed tool calls in OpenAI's shape: each call's first delta has ``index``, ``id``, ``type`` and the
function's ``name`` (arguments ``""`` or their first fragment); later deltas carry only ``index`` and the next
fragment of ``arguments``. Concatenated per index, they are the final parse; ids differ between calls;
with one call allowed (``parallel_tool_calls: false``) the second is never announced. A call announced and then
botched (broken JSON, cut by ``max_tokens``) stays a call in the stream, with what the model wrote as its
arguments, and the stream says it is broken; its text never comes a second time as content. A forced call cut
short is the call streamed or not."""

from __future__ import annotations

import json

import pytest

from llmserve.entrypoints.openai.tool_parsers.forced import NamedToolParser, RequiredToolParser
from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
from llmserve.entrypoints.openai.tool_parsers.streaming import ToolCallStream

TEXT = ('Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


def _run(stream: ToolCallStream, text: str, step: int) -> tuple[str, list[dict]]:
    content, deltas = "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for i, piece in enumerate(pieces):
        c, d = stream.feed(piece, final=i == len(pieces) - 1)
        content += c
        deltas += d
    return content, deltas


def _assemble(deltas: list[dict]) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta["index"] not in calls:
            assert set(delta) == {"index", "id", "type", "function"} and delta["type"] == "function"
            assert delta["function"]["name"]
            calls[delta["index"]] = {"id": delta["id"], "name": delta["function"]["name"], "arguments": ""}
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
        calls[delta["index"]]["arguments"] += delta["function"]["arguments"]
    return calls


def test_deltas_reassemble_into_the_calls():
    for step in (1, 2, 5, 11, len(TEXT)):
        content, deltas = _run(ToolCallStream(TOOL_CALL_PARSERS["hermes"]()), TEXT, step)
        calls = _assemble(deltas)
        assert content == "Checking."
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
            ("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "CET"})]
        assert len({c["id"] for c in calls.values()}) == 2
        if step == 1:
            assert len(deltas) > 10   # arguments arrive in fragments, not at the end


def test_one_call_allowed():
    stream = ToolCallStream(TOOL_CALL_PARSERS["hermes"](), max_calls=1)
    _, deltas = _run(stream, TEXT, 4)
    assert set(_assemble(deltas)) == {0} and stream.called


def test_plain_content_streams_as_content():
    stream = ToolCallStream(TOOL_CALL_PARSERS["llama3_json"]())
    content, deltas = _run(stream, "  It is sunny in Paris.", 3)
    assert content == "  It is sunny in Paris." and deltas == [] and not stream.called


@pytest.mark.parametrize("parser,text,content,arguments", [
    ("hermes", 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}, oops}</tool_call>',
     "Checking.", '{"city": "Paris"}'),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Par', "", '{"city": "Par'),
])
def test_a_botched_call_stays_the_call_that_was_announced(parser, text, content, arguments):
    assert TOOL_CALL_PARSERS[parser]().parse(text, final=True).content == text   # not streamed: all content
    for step in (1, 3, len(text)):
        stream = ToolCallStream(TOOL_CALL_PARSERS[parser]())
        got_content, deltas = _run(stream, text, step)
        calls = _assemble(deltas)
        if step == len(text):   # nothing was announced before the end: the answer is plain content
            assert (got_content, calls, stream.broken) == (text, {}, False)
            continue
        assert got_content == content and stream.broken and stream.called
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", arguments)]


@pytest.mark.parametrize("make,text", [
    (RequiredToolParser, '[{"name": "get_weather", "parameters": {"city": "Pa'),
    (lambda: NamedToolParser("get_weather"), '{"city": "Pa'),
])
def test_a_forced_call_cut_short_is_the_call_streamed_or_not(make, text):
    """The grammar made the output a call: cut by ``max_tokens`` it stays that call, with its arguments as
    written, in the non-streamed answer as in the stream (which marks itself broken)."""
    parsed = make().parse(text, final=True)
    assert parsed.content == "" and [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", '{"city": "Pa')]
    for step in (1, 3, len(text)):
        stream = ToolCallStream(make())
        content, deltas = _run(stream, text, step)
        assert content == "" and stream.broken
        assert [(c["name"], c["arguments"]) for c in _assemble(deltas).values()] == [("get_weather", '{"city": "Pa')]


def test_a_valid_stream_is_not_broken():
    stream = ToolCallStream(TOOL_CALL_PARSERS["hermes"]())
    _run(stream, TEXT, 3)
    assert stream.called and not stream.broken


def test_with_one_call_allowed_a_botched_second_call_does_not_undo_the_first():
    """``parallel_tool_calls: false`` keeps the first call; what the model wrote after it, botched or not,
    decides nothing, streamed or not."""
    from llmserve.entrypoints.openai.tool_calling import ToolCalling

    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {"tz": }}</tool_call>')
    calling = ToolCalling(TOOL_CALL_PARSERS["hermes"](), None, 1, True)
    message, finish = calling.message(text, "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city": "Paris"}')]
    stream = calling.stream()
    content, deltas = _run(stream, text, 5)
    assert content == "" and not stream.broken
    assert [(c["name"], c["arguments"]) for c in _assemble(deltas).values()] == [("get_weather", '{"city": "Paris"}')]
