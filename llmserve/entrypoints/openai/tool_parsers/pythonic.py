"""``--tool-call-parser pythonic``: Llama 3.2 / Llama 4, ToolACE and Gemma 3 with vLLM's pythonic template.

    [get_weather(city="Paris"), get_time(zone="CET")]

optionally inside ``<|python_start|>`` ... ``<|python_end|>``. Arguments are Python literals (``true`` /
``false`` / ``null`` also accepted) turned into JSON. A call's name is shown as soon as its ``(`` is seen,
its arguments when its ``)`` is: a half-written Python literal has no JSON prefix.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from llmserve.entrypoints.openai.tool_parsers.base import ParsedCall, ParsedOutput, ToolCallParser, finish
from llmserve.entrypoints.openai.tool_parsers.json_scan import skip_whitespace

PYTHON_START = "<|python_start|>"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NAMED_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class PythonicToolParser(ToolCallParser):
    def parse(self, text: str, final: bool) -> ParsedOutput:
        at = skip_whitespace(text, 0)
        rest = text[at:]
        if rest.startswith(PYTHON_START):
            at = skip_whitespace(text, at + len(PYTHON_START))
        elif not final and PYTHON_START.startswith(rest):
            return ParsedOutput("")
        if at >= len(text):
            return ParsedOutput(text if final else "")
        if text[at] != "[":
            return ParsedOutput(text)
        return finish(text, "", _calls(text, at + 1), True, final)


def _calls(text: str, at: int) -> list[ParsedCall]:
    calls: list[ParsedCall] = []
    while True:
        at = skip_whitespace(text, at)
        match = _NAME.match(text, at)
        if match is None or match.end() >= len(text) or text[match.end()] != "(":
            if match is not None and match.end() < len(text):
                calls.append(ParsedCall(None, "", False))   # not a call: fails at the end
            return calls
        close = _closing_paren(text, match.end())
        if close is None:
            calls.append(ParsedCall(match.group(), "", False))
            return calls
        calls.append(_call(text[at:close + 1], match.group()))
        at = skip_whitespace(text, close + 1)
        if at >= len(text) or text[at] != ",":
            return calls
        at += 1


def _closing_paren(text: str, open_at: int) -> int | None:
    """Index of the ``)`` matching the ``(`` at ``open_at``, skipping brackets and quoted strings."""
    depth, i, quote = 0, open_at, None
    while i < len(text):
        c = text[i]
        if quote is not None:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i if c == ")" else None
        i += 1
    return None


def _call(source: str, name: str) -> ParsedCall:
    """One complete ``name(k=v, ...)``; arguments that are not literals leave the call invalid."""
    try:
        node = ast.parse(source, mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            raise ValueError("positional or ** arguments")
        arguments = {k.arg: _literal(k.value) for k in node.keywords}
    except (SyntaxError, ValueError):
        return ParsedCall(name, "", True)
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False), True)


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and not isinstance(node.value, bytes):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict) and all(key is not None for key in node.keys):
        return {str(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    raise ValueError(f"not a literal: {ast.dump(node)[:80]}")
