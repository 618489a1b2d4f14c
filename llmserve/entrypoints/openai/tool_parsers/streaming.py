"""OpenAI's streamed tool calls from a parser: each call's ``id``, ``type`` and ``name`` in its first delta,
then fragments of its ``arguments``; content deltas as usual. One :class:`ToolCallStream` per choice.

A stream cannot take back a call it has announced. When the calls turn out invalid at the end (broken JSON,
or cut by ``max_tokens``), the non-streamed answer falls back to plain content (a forced call's stays the
call), but the stream keeps the calls it announced, sends the rest of their arguments as written and marks
itself :attr:`ToolCallStream.broken`; it never sends the call's text a second time as content."""

from __future__ import annotations

import uuid
from typing import Any

from llmserve.entrypoints.openai.tool_parsers.base import ParsedCall, ToolCallParser, final_parse


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def tool_call_json(call: ParsedCall, call_id: str) -> dict[str, Any]:
    """A finished call as the API's ``message.tool_calls[i]``."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ToolCallStream:
    def __init__(self, parser: ToolCallParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls   # parallel_tool_calls=false: only the first call
        self.text = ""
        self.content_sent = 0
        self.sent: list[int] = []    # per announced call: how much of its arguments went out
        self.broken = False          # the announced calls did not end as valid calls
        self.calls: list[ParsedCall] = []   # the calls as last parsed

    @property
    def called(self) -> bool:
        return bool(self.sent)

    def call_is_valid(self, index: int) -> bool:
        """Whether announced call ``index`` is, as parsed so far, a whole call with a JSON-object of arguments."""
        return index < len(self.calls) and self.calls[index].is_valid()

    def feed(self, new_text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """Add the newly generated text; returns the new content and the ``delta.tool_calls`` entries."""
        self.text += new_text
        parsed = final_parse(self.parser, self.text, self.max_calls) if final else self.parser.parse(self.text, False)
        if final and self.sent and not parsed.calls:
            parsed = self.parser.parse(self.text, False)   # the calls as they were streamed, to their end
        self.calls = parsed.calls[:self.max_calls]
        content = parsed.content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(parsed.content))
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(parsed.calls[:self.max_calls]):
            if index == len(self.sent):
                if call.name is None:
                    break   # calls are announced in order, each once its name is known
                self.sent.append(0)
                deltas.append({"index": index, "id": new_tool_call_id(), "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            fragment = call.arguments[self.sent[index]:]
            if fragment:
                self.sent[index] = len(call.arguments)
                if deltas and deltas[-1]["index"] == index:
                    deltas[-1]["function"]["arguments"] += fragment
                else:
                    deltas.append({"index": index, "function": {"arguments": fragment}})
        if final and self.sent:
            self.broken = not all(call.is_valid() for call in self.calls)
        return content, deltas
