"""Scanning JSON that is still being generated.

A streamed tool call is a JSON object whose ``arguments`` value grows token by token. Streaming it as
OpenAI does (the name once, then argument fragments) needs to know, in a prefix of the object, which keys
are complete and where each value starts and (if it has) ends, without parsing the unfinished value.
The scanner tracks strings and nesting only; the final text is still checked with :func:`json.loads`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_WHITESPACE = " \t\r\n"


@dataclass
class Span:
    """A value's raw text: ``text[start:end]``; ``end`` is None while the value is unfinished."""

    start: int
    end: int | None

    def raw(self, text: str) -> str:
        return text[self.start:len(text) if self.end is None else self.end]


@dataclass
class PartialObject:
    """An object seen so far: its complete keys with their value spans; ``end`` (past ``}``) once closed."""

    start: int
    end: int | None = None
    fields: dict[str, Span] = field(default_factory=dict)

    def value(self, text: str, key: str) -> Any:
        """A complete value, decoded; None while it is unfinished, absent, or not JSON."""
        span = self.fields.get(key)
        if span is None or span.end is None:
            return None
        try:
            return json.loads(span.raw(text))
        except ValueError:
            return None


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """Where the JSON value starting at ``text[i]`` ends (an index past it), or None if it runs off the end
    of ``text``. A bare scalar (number, literal) is finished only by what follows it."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def _string_end(text: str, i: int) -> int | None:
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == '"':
            return j + 1
        j += 1
    return None


def scan_object(text: str, start: int) -> PartialObject | None:
    """Scan the object whose ``{`` is at ``text[start]`` (None if there is none there). Malformed text
    stops the scan where it goes wrong: what was complete before stays, and ``end`` stays None."""
    if start >= len(text) or text[start] != "{":
        return None
    obj = PartialObject(start)
    i = skip_whitespace(text, start + 1)
    if i < len(text) and text[i] == "}":
        obj.end = i + 1
        return obj
    while i < len(text):
        if text[i] != '"':
            return obj
        key_end = _string_end(text, i)
        if key_end is None:
            return obj
        try:
            key = json.loads(text[i:key_end])
        except ValueError:
            return obj
        i = skip_whitespace(text, key_end)
        if i >= len(text) or text[i] != ":":
            return obj
        i = skip_whitespace(text, i + 1)
        if i >= len(text):
            return obj
        end = value_end(text, i)
        obj.fields[key] = Span(i, end)
        if end is None:
            return obj
        i = skip_whitespace(text, end)
        if i >= len(text):
            return obj
        if text[i] == "}":
            obj.end = i + 1
            return obj
        if text[i] != ",":
            return obj
        i = skip_whitespace(text, i + 1)
    return obj


def scan_array_of_objects(text: str, start: int) -> tuple[list[PartialObject], int | None]:
    """Scan ``[{...}, {...}]`` from the ``[`` at ``text[start]``: the objects seen so far and the index past
    ``]`` (None while the array is open or when it is malformed)."""
    objects: list[PartialObject] = []
    if start >= len(text) or text[start] != "[":
        return objects, None
    i = skip_whitespace(text, start + 1)
    if i < len(text) and text[i] == "]":
        return objects, i + 1
    while i < len(text):
        obj = scan_object(text, i)
        if obj is None:
            return objects, None
        objects.append(obj)
        if obj.end is None:
            return objects, None
        i = skip_whitespace(text, obj.end)
        if i >= len(text):
            return objects, None
        if text[i] == "]":
            return objects, i + 1
        if text[i] != ",":
            return objects, None
        i = skip_whitespace(text, i + 1)
    return objects, None
