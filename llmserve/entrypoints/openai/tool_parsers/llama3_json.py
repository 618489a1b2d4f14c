"""``--tool-call-parser llama3_json``: Llama 3.1 / 3.2 / 3.3 JSON tool calls.

    {"name": "get_weather", "parameters": {"city": "Paris"}}

optionally after ``<|python_tag|>``, several separated by ``;``. The output is a tool call only if it starts
with one (after whitespace); anything else is plain content.
"""

from __future__ import annotations

from typing import Any

from llmserve.entrypoints.openai.tool_parsers.base import (
    ParsedCall, ParsedOutput, ToolCallParser, call_from_object, finish)
from llmserve.entrypoints.openai.tool_parsers.json_scan import scan_object, skip_whitespace
from llmserve.entrypoints.openai.tool_parsers.strict import Vocabulary, llama3_json_grammar

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolCallParser):
    needs_special_tokens = True   # <|python_tag|> is a special token

    def parse(self, text: str, final: bool) -> ParsedOutput:
        at = skip_whitespace(text, 0)
        rest = text[at:]
        if rest.startswith(PYTHON_TAG):
            at = skip_whitespace(text, at + len(PYTHON_TAG))
        elif not final and PYTHON_TAG.startswith(rest):   # nothing yet, or the tag still forming
            return ParsedOutput("")
        if at >= len(text):
            return ParsedOutput(text if final else "")
        if text[at] != "{":
            return ParsedOutput(text)
        calls: list[ParsedCall] = []
        while at < len(text):
            obj = scan_object(text, at)
            if obj is None:
                break
            calls.append(call_from_object(text, obj, ("parameters", "arguments")))
            if obj.end is None:
                break
            after = skip_whitespace(text, obj.end)
            if after >= len(text) or text[after] != ";":
                break
            at = skip_whitespace(text, after + 1)
        return finish(text, "", calls, True, final)

    def strict_grammar(self, tools: list[dict[str, Any]], max_calls: int | None, vocabulary: Vocabulary,
                       answer: str | None = None) -> str | None:
        if answer is not None:
            return None   # a JSON answer would read as calls
        return llama3_json_grammar(tools, max_calls, vocabulary, PYTHON_TAG)
