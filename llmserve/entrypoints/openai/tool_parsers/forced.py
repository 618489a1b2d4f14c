"""Tool calls the grammar forces: ``tool_choice: "required"`` and a named function.

With ``required`` the output is constrained to a JSON array of ``{"name": ..., "parameters": {...}}``, one
item per call, each name one of the request's tools and its parameters valid under that tool's schema; with
a named function the output is that function's arguments object. Property order is the schema's, so a
call's name arrives before its arguments and streams as OpenAI's do. Output cut by ``max_tokens`` is still
the calls (the last one's arguments as written, not valid JSON), streamed or not: the grammar made them calls,
and a stream has already announced them.
"""

from __future__ import annotations

import json
from typing import Any

from llmserve.entrypoints.openai.tool_parsers.base import ParsedCall, ParsedOutput, ToolCallParser, call_from_object
from llmserve.entrypoints.openai.tool_parsers.json_scan import scan_array_of_objects, skip_whitespace

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of ``tool_choice: "required"`` over OpenAI-shaped ``tools``."""
    items = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                       "parameters": t["function"].get("parameters") or _ANY_OBJECT},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def named_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of ``tool_choice: {"type": "function", "function": {"name": ...}}``."""
    return tool["function"].get("parameters") or _ANY_OBJECT


def schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema)


class RequiredToolParser(ToolCallParser):
    def parse(self, text: str, final: bool) -> ParsedOutput:
        objects, _ = scan_array_of_objects(text, skip_whitespace(text, 0))
        calls = [call_from_object(text, obj, ("parameters",)) for obj in objects]
        if final:   # cut by max_tokens: the calls named so far, as written (a stream has announced them)
            calls = [call for call in calls if call.name is not None]
            return ParsedOutput("", calls) if calls else ParsedOutput(text)
        return ParsedOutput("", calls)


class NamedToolParser(ToolCallParser):
    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [ParsedCall(self.name, text.lstrip(), final)])
