"""Grammars for ``tool_choice: "auto"`` with strict tools: the model answers freely, but every call it writes in
its parser's format names one of the tools, and a strict tool's arguments are valid under its schema (another
tool's are a JSON object).

Each grammar is Lark for llguidance: free text, then (from the format's call marker on) calls whose JSON is the
tools' schemas (``%json``), then only whitespace. Free text is text that does not contain a marker (a regex with
the marker excluded; spelled in plain tokens the marker can only start the calls, through a lazy lexeme that
ends at it), with the tokenizer's added tokens between runs of it (Qwen3's ``<think>``, Magistral's ``[THINK]``:
llguidance matches added tokens as tokens, never inside a regex). A marker the tokenizer holds as one token
(Qwen's and Hermes 2 Pro's ``<tool_call>``, Mistral's ``[TOOL_CALLS]``, Llama 3's ``<|python_tag|>``) is matched
as that token or as its text. So the parser, which finds the markers in the decoded text, reads as calls exactly
what the grammar held to the schemas. ``max_calls`` 1 (``parallel_tool_calls: false``) allows one call.

With a JSON ``response_format`` (``answer``), the output is that JSON or calls (OpenAI's rule: the format shapes
the answer, and the model may call tools instead), with no free text before them: it is no answer in the format.
Llama 3's JSON calls are answers in JSON themselves, so its format has no such grammar.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_HEADER = "%llguidance {}\n"
_SPACE = "[ \\t\\r\\n]"   # the whitespace the parsers skip (json_scan)
_WS = f"WS: /{_SPACE}*/\n"


@dataclass(frozen=True)
class Vocabulary:
    """What a grammar needs of the tokenizer: its added tokens (text -> id) and its end-of-sequence ids."""

    added: dict[str, int]
    eos: frozenset[int]

    @classmethod
    def of(cls, tokenizer: Any, eos_token_ids: list[int] | None = None) -> Vocabulary:
        """``eos_token_ids``: the tokens that end a sequence (default: the tokenizer's EOS), which a grammar must
        not name: the engine ends the output there."""
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return cls({token.content: index for index, token in tokenizer.added_tokens_decoder.items()},
                   frozenset(eos_token_ids))

    def marker(self, text: str) -> str:
        """A marker as Lark: its text, or the added token it is."""
        token = self.added.get(text)
        return json.dumps(text) if token is None else f"({json.dumps(text)} | <[{token}]>)"

    def token(self, text: str) -> str | None:
        """The added token ``text`` is, as Lark; None where it is not one."""
        token = self.added.get(text)
        return None if token is None else f"<[{token}]>"

    @functools.cached_property
    def _sorted(self) -> list[tuple[int, str]]:
        """(id, text) of the added tokens but EOS, by id (once per server: the vocabulary is the server's)."""
        return sorted((i, text) for text, i in self.added.items() if i not in self.eos)

    def others(self, marker: str) -> str | None:
        """The added tokens but ``marker`` and EOS, as one Lark token set; None where there are none."""
        ids = [i for i, text in self._sorted if text != marker]
        return f"<[{_ranges(ids)}]>" if ids else None


def _ranges(ids: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3,7`` (llguidance's token set syntax)."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def arguments_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A strict tool's arguments follow its schema; any other tool's are some JSON object."""
    function = tool["function"]
    return (function.get("parameters") or _ANY_OBJECT) if function.get("strict") else _ANY_OBJECT


def call_schema(tools: list[dict[str, Any]], arguments_key: str, name_first: bool = True,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One call object as the format writes it: ``{"name": <a tool's name>, <arguments_key>: <its arguments>}``
    (also with the arguments first unless ``name_first``), with the optional ``extra`` properties."""
    calls = []
    for tool in tools:
        pairs = [("name", {"const": tool["function"]["name"]}), (arguments_key, arguments_schema(tool))]
        for order in ([pairs] if name_first else [pairs, pairs[::-1]]):
            calls.append({"type": "object", "properties": {**dict(order), **(extra or {})},
                          "required": ["name", arguments_key], "additionalProperties": False})
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _repeat(rule: str, separator: str, max_calls: int | None) -> str:
    """``rule``, then (unless one call at most) more of it after ``separator``."""
    return rule if max_calls == 1 else f"{rule} ({separator} {rule})*"


def _regex_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in r"\.^$|?*+()[]{}/" else c for c in text)


def _free(others: str | None) -> str:
    """Runs of ``TEXT`` with the added tokens ``others`` between them (two runs never meet)."""
    return f"free: TEXT ({others} TEXT)*\n" if others else "free: TEXT\n"


def answer_rule(schema: str, any_whitespace: bool) -> str:
    """The ``answer`` rule of a JSON ``response_format``: its schema (JSON text; ``true`` for any value) as the
    structured-output compiler runs it on its own (``any_whitespace``: whitespace between JSON tokens)."""
    value = json.loads(schema)
    value = {} if value is True else value   # (false never gets here: the request's constraint was compiled)
    own = value.get("x-guidance")   # the schema's own options win, as with the compiler's defaults
    guidance = {"whitespace_flexible": any_whitespace, **(own if isinstance(own, dict) else {})}
    return f"answer: %json {json.dumps({**value, 'x-guidance': guidance})}\n"


def _free_text_then(marker: str, vocabulary: Vocabulary, calls: str, answer: str | None) -> str:
    """``start``: free text, or free text up to the first ``marker`` and then ``calls``. Free text never holds the
    marker, as text or as a token: where the model writes it, calls follow. Runs of text are separated by added
    tokens, so no two runs meet where they would spell the marker between them. With an ``answer`` rule: the
    answer, or ``calls`` after the marker and nothing but whitespace (llguidance's lexer takes the longest match,
    so an answer beside free text, which can always go on, could never end)."""
    if answer:
        return f"start: answer | WS {vocabulary.marker(marker)} {calls}\n" + answer
    others, token = vocabulary.others(marker), vocabulary.token(marker)
    return "".join([
        f"start: free | pre {calls}" + (f" | free {token} {calls}" if token else "") + "\n",
        _free(others),
        f"pre: (TEXT {others})* intro\n" if others else "pre: intro\n",
        f"TEXT: /(?s:.*)/ & ~/(?s:.*){_regex_escape(marker)}(?s:.*)/\n",
        f"intro[lazy]: /(?s:.*)/ {json.dumps(marker)}\n",
    ])


def hermes_grammar(tools: list[dict[str, Any]], max_calls: int | None, vocabulary: Vocabulary,
                   answer: str | None, start: str, end: str) -> str:
    """``text<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` and more such blocks (the keys in
    either order, as Hermes 2 Pro's prompt writes them arguments first)."""
    block = f"WS call WS {vocabulary.marker(end)} WS"
    calls = _repeat(block, vocabulary.marker(start), max_calls)
    return (_HEADER + _free_text_then(start, vocabulary, calls, answer)
            + f"call: %json {json.dumps(call_schema(tools, 'arguments', name_first=False))}\n" + _WS)


def mistral_grammar(tools: list[dict[str, Any]], max_calls: int | None, vocabulary: Vocabulary,
                    answer: str | None, marker: str, args: str) -> str:
    """``text[TOOL_CALLS]`` then a JSON array of calls (tokenizer v3 and older; an item may carry the ``id``
    those tokenizers write) or ``name[ARGS]{...}`` calls, each after its own marker (v11 and newer)."""
    array = {"type": "array", "items": call_schema(tools, "arguments", extra={"id": {"type": "string"}}),
             "minItems": 1}
    if max_calls == 1:
        array["maxItems"] = 1
    named = " | ".join(f"{json.dumps(t['function']['name'])} WS {vocabulary.marker(args)} WS args_{i}"
                       for i, t in enumerate(tools))
    arguments = "".join(f"args_{i}: %json {json.dumps(arguments_schema(t))}\n" for i, t in enumerate(tools))
    calls = f"WS (array | {_repeat('named', f'WS {vocabulary.marker(marker)} WS', max_calls)}) WS"
    return (_HEADER + _free_text_then(marker, vocabulary, calls, answer) + f"array: %json {json.dumps(array)}\n"
            f"named: {named}\n" + arguments + _WS)


def llama3_json_grammar(tools: list[dict[str, Any]], max_calls: int | None, vocabulary: Vocabulary,
                        tag: str) -> str:
    """Content that does not start with ``{`` or the tag, or calls ``{"name": ..., "parameters": {...}}`` (after
    an optional ``<|python_tag|>``) separated by ``;``: the parser reads an output as calls when it starts with
    one, so an output that starts with ``{`` is one. The whitespace and a tag spelled in plain tokens before the
    first call are one lexeme (``LEAD``), so that free text, which may start the same way, is ruled out only
    once the tag is complete."""
    others, token = vocabulary.others(tag), vocabulary.token(tag)
    calls = f"{_repeat('call', 'SEP', max_calls)} WS"
    return (_HEADER + f"start: free | LEAD {calls}" + (f" | WS {token} WS {calls}" if token else "") + "\n"
            + _free(others)
            + f"TEXT: /(?s:.*)/ & ~/{_SPACE}*(\\{{|{_regex_escape(tag)})(?s:.*)/\n"
            + f"LEAD: /{_SPACE}*({_regex_escape(tag)})?{_SPACE}*/\n"
            + f"SEP: /{_SPACE}*;{_SPACE}*/\n"
            + f"call: %json {json.dumps(call_schema(tools, 'parameters'))}\n" + _WS)
