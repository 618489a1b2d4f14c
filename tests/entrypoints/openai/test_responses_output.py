"""The streamed output events of /v1/responses: a function call whose text turned out botched at the end
is closed ``incomplete`` (never ``completed``), and its text is not sent again as a message."""

from __future__ import annotations

from llmserve.entrypoints.openai.responses_output import OutputEvents
from llmserve.entrypoints.openai.tool_calling import ToolCalling
from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS


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
