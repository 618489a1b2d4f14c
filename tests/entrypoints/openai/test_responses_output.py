"""The output items of /v1/responses, streamed and not: a function call whose text turned out botched at the
end is closed ``incomplete`` (never ``completed``), and its text is not sent again as a message; a message
followed by a call is complete even when the output was cut later; the arguments' done event names the
function. And the input side: an earlier turn's text and its calls render as one assistant message, as chat
sends them."""

from __future__ import annotations

from llmserve.entrypoints.openai.responses_output import OutputEvents, output_items
from llmserve.entrypoints.openai.responses_protocol import ResponsesRequest
from llmserve.entrypoints.openai.tool_calling import ToolCalling
from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
from llmserve.entrypoints.openai.tool_parsers.forced import NamedToolParser


def _events(text: str, step: int = 4) -> list[dict]:
    out = OutputEvents(ToolCalling(TOOL_CALL_PARSERS["hermes"](), None, None, True))
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    return [e for i, p in enumerate(pieces) for e in out.feed(p, final=i == len(pieces) - 1)]


def _done_items(events: list[dict]) -> list[dict]:
    return [e["item"] for e in events if e["type"] == "response.output_item.done"]


def test_a_valid_call_is_completed():
    items = _done_items(_events('Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'))
    assert [(i["type"], i["status"]) for i in items] == [("message", "completed"), ("function_call", "completed")]
    assert items[1]["arguments"] == '{"a": 1}'


def test_a_botched_call_is_incomplete_and_not_repeated_as_text():
    events = _events('Sure.<tool_call>{"name": "f", "arguments": {"a": 1')
    items = _done_items(events)
    assert [(i["type"], i["status"]) for i in items] == [("message", "completed"), ("function_call", "incomplete")]
    assert items[0]["content"][0]["text"] == "Sure." and items[1]["arguments"] == '{"a": 1'
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Sure."


def test_each_call_is_closed_by_its_own_validity():
    """A botched first call closed when the second opens is incomplete; the valid second is completed."""
    items = _done_items(_events('<tool_call>{"name": "f", "arguments": 5}</tool_call>'
                                '<tool_call>{"name": "g", "arguments": {"a": 1}}</tool_call>'))
    assert [(i["name"], i["status"]) for i in items] == [("f", "incomplete"), ("g", "completed")]


def test_the_arguments_done_event_names_the_function():
    done = [e for e in _events('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
            if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"]) for e in done] == [("f", '{"a": 1}')]


def test_a_message_before_a_call_is_complete_though_the_output_was_cut_after_it():
    text = 'Let me check. <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>\n'
    items = output_items(ToolCalling(TOOL_CALL_PARSERS["hermes"](), None, None, True), text, incomplete=True)
    assert [(i["type"], i["status"]) for i in items] == [("message", "completed"), ("function_call", "completed")]
    streamed = _done_items(_events(text))
    assert [(i["type"], i["status"]) for i in streamed][0] == ("message", "completed")


def test_a_forced_call_cut_short_is_an_incomplete_call_streamed_or_not():
    calling = ToolCalling(NamedToolParser("f"), None, None, False)
    items = output_items(calling, '{"a": 1', incomplete=True)
    assert [(i["type"], i["name"], i["arguments"], i["status"]) for i in items] == [
        ("function_call", "f", '{"a": 1', "incomplete")]
    out = OutputEvents(calling)
    streamed = _done_items(out.feed('{"a"', final=False) + out.feed(": 1", final=True))
    assert [(i["type"], i["arguments"], i["status"]) for i in streamed] == [("function_call", '{"a": 1', "incomplete")]


def test_an_earlier_turns_text_and_calls_are_one_assistant_message():
    """``input += response.output``: a message item then its function_call items render as chat's one assistant
    message with content and tool_calls (the template would otherwise see two assistant turns)."""
    request = ResponsesRequest.model_validate({"model": "m", "input": [
        {"role": "user", "content": "Time?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "12:00"}]})
    messages = [m.model_dump(exclude_none=True) for m in request.as_chat_request().messages]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["content"] == "Sure." and [c["id"] for c in messages[1]["tool_calls"]] == ["c1"]
