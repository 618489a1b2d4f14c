"""What every tool-call parser produces, and the rules they share.

A parser reads the text a model has generated so far and splits it into the assistant's ``content`` and
its tool calls. It is called again on the longer text after every step, so what it returns must only ever
grow: the content and each call's ``arguments`` are prefixes of what a later call returns (a marker that
may still be forming at the end of the text is held back, not shown as content). That is what lets one
parser serve both the final response and OpenAI's streamed deltas.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from llmserve.entrypoints.openai.tool_parsers.json_scan import PartialObject
from llmserve.entrypoints.openai.tool_parsers.strict import Vocabulary


@dataclass
class ParsedCall:
    """One tool call: ``name`` once it is complete; ``arguments`` the JSON text seen so far (all of it once
    ``complete``)."""

    name: str | None
    arguments: str
    complete: bool

    def is_valid(self) -> bool:
        return self.complete and isinstance(self.name, str) and bool(self.name) and arguments_are_valid(self.arguments)


def arguments_are_valid(arguments: str) -> bool:
    """Whether a call's ``arguments`` text is a JSON object (OpenAI's arguments always are)."""
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


@dataclass
class ParsedOutput:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser(ABC):
    """``--tool-call-parser NAME``: the output format of one family of models."""

    # True when the format's markers are special tokens in the models that use it, so that decoding must
    # keep special tokens for the parser to see them (as vLLM's parsers set skip_special_tokens=False).
    needs_special_tokens: bool = False

    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """Split ``text`` into content and calls. With ``final`` the generation has ended: calls are then
        all valid, or the whole text is content (a model that started a call and botched it still answers
        with what it wrote); the forced formats (forced.py) keep every call that has a name."""

    def strict_grammar(self, tools: list[dict[str, Any]], max_calls: int | None, vocabulary: Vocabulary,
                       answer: str | None = None) -> str | None:
        """The grammar under which the model writes free text and calls in this format whose arguments match
        the schemas of the ``strict`` tools (``tool_choice: "auto"``: :mod:`.strict`); with an ``answer`` rule
        (a JSON ``response_format``: :func:`.strict.answer_rule`), output without calls is that answer. None
        where the format has no such grammar."""
        return None


def hold_back(text: str, marker: str) -> str:
    """``text`` without a trailing proper prefix of ``marker`` (it may be the start of the marker)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


def finish(text: str, content: str, calls: list[ParsedCall], started: bool, final: bool) -> ParsedOutput:
    """The common ending of a parse: at the end of generation, a tool-call section that did not yield only
    valid calls falls back to plain content (all of ``text``)."""
    if final and started and (not calls or not all(call.is_valid() for call in calls)):
        return ParsedOutput(text)
    return ParsedOutput(content, calls)


def final_parse(parser: ToolCallParser, text: str, max_calls: int | None) -> ParsedOutput:
    """A finished generation's parse when only its first ``max_calls`` calls are kept (``parallel_tool_calls:
    false``): a botched call past them does not turn the kept ones into content."""
    parsed = parser.parse(text, final=True)
    if max_calls is None or parsed.calls:
        return ParsedOutput(parsed.content, parsed.calls[:max_calls])
    partial = parser.parse(text, final=False)
    kept = partial.calls[:max_calls]
    if kept and all(call.is_valid() for call in kept):
        return ParsedOutput(partial.content, kept)
    return parsed


def call_from_object(text: str, obj: PartialObject, argument_keys: tuple[str, ...]) -> ParsedCall:
    """A call written as ``{"name": ..., "<arguments key>": {...}}``. Arguments given as a JSON string
    (some models quote them) are shown once complete, decoded."""
    name = obj.value(text, "name")
    key = next((k for k in argument_keys if k in obj.fields), None)
    complete = obj.end is not None
    if key is None:
        return ParsedCall(name if isinstance(name, str) else None, "{}" if complete else "", complete)
    span = obj.fields[key]
    raw = span.raw(text)
    if raw.startswith('"'):
        decoded = obj.value(text, key)
        arguments = decoded if isinstance(decoded, str) else ""
    else:
        arguments = raw
    return ParsedCall(name if isinstance(name, str) else None, arguments, complete)
