"""The tokens a Lark grammar names by id or by name (``<[100-200]>``, ``<|im_end|>``, ``</s>``).

A constrained output ends with the model's EOS where its grammar may end; the matcher adds that EOS itself,
so a grammar cannot also ask for an EOS token as part of the output (the sequence would stop there, short of
its grammar, and the step would find no token allowed). The front end refuses such a grammar with this scan.
Quoted strings, ``/regex/`` literals and ``//`` and ``#`` comments are skipped: a ``<`` inside them is text. A
negated range (``<[^0-1]>``) names every token outside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

_REFERENCE = re.compile(r"<\[(\^?[0-9,\s-]*)\]>|<([^\s<>\[\]\"]+)>")


def named_stop_token(grammar: str, token_id: Callable[[str], int | None], stop_ids: frozenset[int]) -> int | None:
    """The first of ``stop_ids`` the grammar names, if any. ``token_id`` maps a special token's text to its id
    (None when the tokenizer has none: llguidance reports that itself)."""
    for ranges, name in _references(grammar):
        if name is not None:
            if token_id(name) in stop_ids:
                return token_id(name)
            continue
        negated = ranges.startswith("^")   # every token but these
        spans = []
        for part in filter(None, (p.strip() for p in ranges.removeprefix("^").split(","))):
            low, _, high = part.partition("-")
            if low.isdigit() and (not high or high.isdigit()):
                spans.append((int(low), int(high or low)))
        hit = next((s for s in sorted(stop_ids) if any(a <= s <= b for a, b in spans) != negated), None)
        if hit is not None:
            return hit
    return None


def _references(grammar: str) -> Iterator[tuple[str, str | None]]:
    """Each token reference outside literals and comments: ``(ranges, None)`` or ``("", name)``."""
    i = 0
    while i < len(grammar):
        c = grammar[i]
        if grammar.startswith(("//", "#"), i):   # a comment, to the end of its line
            end = grammar.find("\n", i)
            i = len(grammar) if end < 0 else end
        elif c in "\"/":   # a string or a regex literal, to its unescaped closing quote or slash
            i += 1
            while i < len(grammar) and grammar[i] != c:
                i += 2 if grammar[i] == "\\" else 1
            i += 1
        elif c == "<" and (match := _REFERENCE.match(grammar, i)):
            yield (match.group(1), None) if match.group(1) is not None else ("", f"<{match.group(2)}>")
            i = match.end()
        else:
            i += 1
