"""``--tool-call-parser mistral``: Mistral and Mixtral instruct models, both generations of the format.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]     (tokenizer v3 and older)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}                              (tokenizer v11 and newer)

Text before ``[TOOL_CALLS]`` is the content. In the newer form each call starts with its own marker.
"""

from __future__ import annotations

import re
from typing import Any

from llmserve.entrypoints.openai.tool_parsers.base import (
    ParsedCall, ParsedOutput, ToolCallParser, call_from_object, finish, hold_back)
from llmserve.entrypoints.openai.tool_parsers.json_scan import scan_array_of_objects, scan_object, skip_whitespace
from llmserve.entrypoints.openai.tool_parsers.strict import Vocabulary, mistral_grammar

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class MistralToolParser(ToolCallParser):
    needs_special_tokens = True   # [TOOL_CALLS] and [ARGS] are control tokens

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(MARKER)
        if first < 0:
            return ParsedOutput(text if final else hold_back(text, MARKER))
        at = skip_whitespace(text, first + len(MARKER))
        if at < len(text) and text[at] == "[":
            objects, _ = scan_array_of_objects(text, at)
            calls = [call_from_object(text, obj, ("arguments", "parameters")) for obj in objects]
        else:
            calls = _named_calls(text, at)
        return finish(text, text[:first], calls, True, final)

    def strict_grammar(self, tools: list[dict[str, Any]], max_calls: int | None, vocabulary: Vocabulary,
                       answer: str | None = None) -> str | None:
        return mistral_grammar(tools, max_calls, vocabulary, answer, MARKER, ARGS)


def _named_calls(text: str, at: int) -> list[ParsedCall]:
    """``name[ARGS]{...}`` (or ``name{...}``), each later one after another ``[TOOL_CALLS]``."""
    calls: list[ParsedCall] = []
    while at < len(text):
        match = _NAME.match(text, at)
        if match is None:
            break
        at = match.end()
        if text.startswith(ARGS, at):
            at += len(ARGS)
        elif at >= len(text) or ARGS.startswith(text[at:]):
            break   # the name or the [ARGS] marker may still be growing
        at = skip_whitespace(text, at)
        obj = scan_object(text, at)
        if obj is None:
            if at < len(text):
                calls.append(ParsedCall(match.group(), "", False))   # malformed: fails at the end
            break
        end = len(text) if obj.end is None else obj.end
        calls.append(ParsedCall(match.group(), text[obj.start:end], obj.end is not None))
        if obj.end is None:
            break
        at = skip_whitespace(text, obj.end)
        if not text.startswith(MARKER, at):
            break
        at = skip_whitespace(text, at + len(MARKER))
    return calls
