"""Structured outputs: constrain generation to a JSON schema, any JSON object, a regex, a choice or a grammar.

- :mod:`.spec`: :class:`StructuredOutputSpec`, the request's constraint as plain data (and the mapping
  from the API's ``response_format`` / ``structured_outputs``).
- :mod:`.compiler`: :class:`GrammarCompiler`, spec -> :class:`CompiledGrammar` for one tokenizer, in a
  thread pool, cached.
- :mod:`.matcher`: :class:`GrammarMatcher` (one sequence's place in its grammar) and
  :class:`GrammarBitmask` (one step's batch bitmask, filled in parallel).
- :mod:`.bitmask`: :func:`apply_token_bitmask`, the sampler's vectorised masking (pure torch).

The spec needs only msgspec (requests carry it, and the server's entry point imports it before torch
loads); the bitmask helpers need torch; the rest needs llguidance (``pip install 'llmserve[structured]'``).
Those are imported on first use, so that code which only carries specs, or only applies bitmasks, does
not depend on more.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from llmserve.structured_output.spec import StructuredOutputError, StructuredOutputSpec

_NEEDS_TORCH = {name: "bitmask" for name in ("allocate_token_bitmask", "apply_token_bitmask", "bitmask_width")}
_NEEDS_LLGUIDANCE = {
    "GrammarCompiler": "compiler",
    "CompiledGrammar": "matcher",
    "GrammarMatcher": "matcher",
    "GrammarBitmask": "matcher",
}

__all__ = [
    "CompiledGrammar",
    "GrammarBitmask",
    "GrammarCompiler",
    "GrammarMatcher",
    "StructuredOutputError",
    "StructuredOutputSpec",
    "allocate_token_bitmask",
    "apply_token_bitmask",
    "bitmask_width",
]


def __getattr__(name: str) -> Any:
    if name in _NEEDS_TORCH:
        return getattr(importlib.import_module(f"{__name__}.{_NEEDS_TORCH[name]}"), name)
    if name not in _NEEDS_LLGUIDANCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_backend(_NEEDS_LLGUIDANCE[name]), name)


def import_backend(module: str) -> ModuleType:
    """Import one of this package's llguidance modules, saying how to install it if it is missing."""
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != "llguidance":
            raise
        raise ImportError(
            "structured outputs need the llguidance package: pip install 'llmserve[structured]'"
        ) from exc
