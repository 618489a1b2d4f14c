"""Grammars for ``tool_choice: "auto"`` with strict tools: the model answers freely, but every call it writes in
its parser's format names one of the tools, and a strict tool's arguments are valid under its schema (another
tool's are a JSON object).

Each grammar is Lark for llguidance: free text up to the format's call marker (a regex that cannot contain the
marker, or a lazy lexeme that ends at it), then calls whose JSON is the tools' schemas (``%json``), then only
whitespace. A marker the tokenizer holds as a special token (Hermes 2 Pro's ``<tool_call>``, Mistral's
``[TOOL_CALLS]``, Llama 3's ``<|python_tag|>``) is matched as that token, which free text can never contain; a
marker spelled in plain tokens is matched as text. ``max_calls`` 1 (``parallel_tool_calls: false``) allows one
call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# The id of ``text`` where the tokenizer holds it as one special token, else None.
SpecialTokenId = Callable[[str], "int | None"]

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_HEADER = "%llguidance {}\n"
_WS = 'WS: /[ \\t\\n]*/\n'


def special_token_ids(tokenizer: Any) -> SpecialTokenId:
    """``text`` -> its id where ``tokenizer`` holds it as one special added token (as llguidance, which reads
    the same flag, sees it), else None."""
    special = {token.content: index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return special.get


def arguments_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A strict tool's arguments follow its schema; any other tool's are some JSON object."""
    function = tool["function"]
    return (function.get("parameters") or _ANY_OBJECT) if function.get("strict") else _ANY_OBJECT


def call_schema(tools: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """One call object as the format writes it: ``{"name": <a tool's name>, <arguments_key>: <its arguments>}``,
    the name first (so that it streams first)."""
    calls = [{"type": "object",
              "properties": {"name": {"const": t["function"]["name"]}, arguments_key: arguments_schema(t)},
              "required": ["name", arguments_key], "additionalProperties": False} for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _marker(text: str, special: SpecialTokenId) -> str:
    token = special(text)
    return json.dumps(text) if token is None else f"<[{token}]>"


def _repeat(rule: str, separator: str, max_calls: int | None) -> str:
    """``rule``, then (unless one call at most) more of it after ``separator``."""
    return rule if max_calls == 1 else f"{rule} ({separator} {rule})*"


def _free_text_then(marker: str, special: SpecialTokenId, calls: str) -> str:
    """``start``: text without ``marker``, or text up to the first ``marker`` and then ``calls``."""
    token = special(marker)
    if token is not None:   # free text cannot hold a special token: it ends where the marker comes
        return f'start: TEXT | TEXT <[{token}]> {calls}\nTEXT: /(?s:.*)/\n'
    literal = json.dumps(marker)
    excluded = f"(?s:.*){_regex_escape(marker)}(?s:.*)"
    return (f"start: TEXT | intro {calls}\n"
            f"TEXT: /(?s:.*)/ & ~/{excluded}/\n"
            f"intro[lazy]: /(?s:.*)/ {literal}\n")


def _regex_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in r"\.^$|?*+()[]{}/" else c for c in text)


def hermes_grammar(tools: list[dict[str, Any]], max_calls: int | None, special: SpecialTokenId,
                   start: str, end: str) -> str:
    """``text<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` and more such blocks."""
    block = f"WS call WS {_marker(end, special)} WS"
    calls = block if max_calls == 1 else f"{block} ({_marker(start, special)} {block})*"
    return (_HEADER + _free_text_then(start, special, calls) +
            f"call: %json {json.dumps(call_schema(tools, 'arguments'))}\n" + _WS)


def mistral_grammar(tools: list[dict[str, Any]], max_calls: int | None, special: SpecialTokenId,
                    marker: str, args: str) -> str:
    """``text[TOOL_CALLS]`` then a JSON array of calls (tokenizer v3 and older) or ``name[ARGS]{...}`` calls,
    each after its own marker (v11 and newer)."""
    array = {"type": "array", "items": call_schema(tools, "arguments"), "minItems": 1}
    if max_calls == 1:
        array["maxItems"] = 1
    named = " | ".join(f"{json.dumps(t['function']['name'])} {_marker(args, special)} args_{i}"
                      for i, t in enumerate(tools))
    arguments = "".join(f"args_{i}: %json {json.dumps(arguments_schema(t))}\n" for i, t in enumerate(tools))
    calls = f"WS (array | {_repeat('named', _marker(marker, special), max_calls)}) WS"
    return (_HEADER + _free_text_then(marker, special, calls) + f"array: %json {json.dumps(array)}\n"
            f"named: {named}\n" + arguments + _WS)


def llama3_json_grammar(tools: list[dict[str, Any]], max_calls: int | None, special: SpecialTokenId,
                        tag: str) -> str:
    """Content that does not start with ``{``, or calls ``{"name": ..., "parameters": {...}}`` (after an optional
    ``<|python_tag|>``) separated by ``;``: the parser reads an output as calls when it starts with one. The
    whitespace and a tag spelled in plain tokens before the first call are one lexeme (``LEAD``), so that free
    text, which may start the same way, is ruled out only once the tag is complete."""
    token = special(tag)
    tag_text = "" if token is not None else f"({_regex_escape(tag)})?[ \\t\\n]*"
    lead = "LEAD" if token is None else f"LEAD (<[{token}]> WS)?"
    return (_HEADER + f"start: TEXT | {lead} {_repeat('call', 'SEP', max_calls)} WS\n"
            f"TEXT: /(?s:.*)/ & ~/[ \\t\\n]*(\\{{|{_regex_escape(tag)})(?s:.*)/\n"
            f"LEAD: /[ \\t\\n]*{tag_text}/\n"
            "SEP: /[ \\t\\n]*;[ \\t\\n]*/\n"
            f"call: %json {json.dumps(call_schema(tools, 'parameters'))}\n" + _WS)
