"""The output of a Responses API response: its items (an assistant ``message`` with ``output_text``, then
one ``function_call`` item per call), whole or as the streamed event sequence OpenAI sends:

    response.output_item.added      (a message, or a function_call)
    response.content_part.added     (message: its output_text part)
    response.output_text.delta ...  /  response.function_call_arguments.delta ...
    response.output_text.done       /  response.function_call_arguments.done
    response.content_part.done      (message)
    response.output_item.done

Both come from the same tool-call parse as chat's, so a streamed response ends equal to a whole one.
"""

from __future__ import annotations

import uuid
from typing import Any

from llmserve.entrypoints.openai.tool_calling import ToolCalling
from llmserve.entrypoints.openai.tool_parsers.base import arguments_are_valid
from llmserve.entrypoints.openai.tool_parsers.streaming import ToolCallStream


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if status == "in_progress" else [_text_part(text)]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def output_items(tool_calling: ToolCalling, text: str, incomplete: bool) -> list[dict[str, Any]]:
    """A finished generation's output items."""
    message, _ = tool_calling.message(text, None)
    calls = message.get("tool_calls") or []
    items = []
    if message["content"] or not calls:   # a cut leaves the message incomplete only if nothing came after it
        items.append(message_item(_id("msg"), message["content"] or "",
                                  "incomplete" if incomplete and not calls else "completed"))
    items += [call_item(_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"],
                        "completed" if arguments_are_valid(call["function"]["arguments"]) else "incomplete")
              for call in calls]
    return items


class OutputEvents:
    """One response's streamed output events, fed the generated text as it arrives."""

    def __init__(self, tool_calling: ToolCalling) -> None:
        self.tool_stream: ToolCallStream | None = tool_calling.stream()
        self.items: list[dict[str, Any]] = []   # finished items, in output order
        self.open: dict[str, Any] | None = None  # the item being streamed: its id, kind and text so far
        self.calls_seen = 0

    def feed(self, text: str, final: bool, incomplete: bool = False) -> list[dict[str, Any]]:
        content, call_deltas = (text, []) if self.tool_stream is None else self.tool_stream.feed(text, final)
        events: list[dict[str, Any]] = []
        if content:
            if self.open is None or self.open["kind"] != "message":
                events += self._close("completed") + self._open_message()
            self.open["text"] += content
            events.append({"type": "response.output_text.delta", **self._where(), "content_index": 0,
                           "delta": content, "logprobs": []})
        for delta in call_deltas:
            if delta["index"] == self.calls_seen:   # a new call: its id and name
                self.calls_seen += 1
                events += self._close("completed")
                item_id = _id("fc")
                self.open = {"kind": "call", "id": item_id, "call_id": delta["id"], "name": delta["function"]["name"],
                             "text": "", "index": len(self.items), "call": delta["index"]}
                events.append({"type": "response.output_item.added", "output_index": len(self.items),
                               "item": call_item(item_id, delta["id"], self.open["name"], "", "in_progress")})
            fragment = delta["function"]["arguments"]
            if fragment:
                self.open["text"] += fragment
                events.append({"type": "response.function_call_arguments.delta", **self._where(), "delta": fragment})
        if final:
            if not self.items and self.open is None:
                events += self._open_message()   # an empty answer is still a message
            events += self._close("incomplete" if incomplete else "completed")
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": self.open["index"]}

    def _open_message(self) -> list[dict[str, Any]]:
        self.open = {"kind": "message", "id": _id("msg"), "text": "", "index": len(self.items)}
        return [{"type": "response.output_item.added", "output_index": self.open["index"],
                 "item": message_item(self.open["id"], "", "in_progress")},
                {"type": "response.content_part.added", **self._where(), "content_index": 0,
                 "part": _text_part("")}]

    def _close(self, status: str) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        where, text = self._where(), self.open["text"]
        if self.open["kind"] == "message":
            item = message_item(self.open["id"], text, status)
            events = [{"type": "response.output_text.done", **where, "content_index": 0, "text": text,
                       "logprobs": []},
                      {"type": "response.content_part.done", **where, "content_index": 0, "part": _text_part(text)}]
        else:
            assert self.tool_stream is not None
            valid = self.tool_stream.call_is_valid(self.open["call"])   # announced calls may turn out botched
            item = call_item(self.open["id"], self.open["call_id"], self.open["name"], text,
                             "completed" if valid else "incomplete")
            events = [{"type": "response.function_call_arguments.done", **where, "name": self.open["name"],
                       "arguments": text}]
        self.items.append(item)
        self.open = None
        return events + [{"type": "response.output_item.done", "output_index": where["output_index"], "item": item}]
