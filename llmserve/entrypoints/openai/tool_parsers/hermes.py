"""``--tool-call-parser hermes``: Hermes 2 Pro, Qwen 2.5 / 3 and others.

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text before the first ``<tool_call>`` is the content; each tag holds one call; a missing closing tag
(generation stopped at end of sequence) is forgiven.
"""

from __future__ import annotations

from typing import Any

from llmserve.entrypoints.openai.tool_parsers.base import (
    ParsedCall, ParsedOutput, ToolCallParser, call_from_object, finish, hold_back)
from llmserve.entrypoints.openai.tool_parsers.json_scan import scan_object, skip_whitespace
from llmserve.entrypoints.openai.tool_parsers.strict import Vocabulary, hermes_grammar

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolCallParser):
    needs_special_tokens = True   # <tool_call> is a special token in Hermes 2 Pro

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(START)
        if first < 0:
            return ParsedOutput(text if final else hold_back(text, START))
        calls: list[ParsedCall] = []
        at = first
        while at >= 0:
            obj = scan_object(text, skip_whitespace(text, at + len(START)))
            if obj is None:
                break
            calls.append(call_from_object(text, obj, ("arguments", "parameters")))
            if obj.end is None:
                break
            at = text.find(START, obj.end)
        return finish(text, text[:first], calls, True, final)

    def strict_grammar(self, tools: list[dict[str, Any]], max_calls: int | None, vocabulary: Vocabulary,
                       answer: str | None = None) -> str | None:
        return hermes_grammar(tools, max_calls, vocabulary, answer, START, END)
