"""Compiling specs into grammars for one tokenizer, with llguidance, off the engine loop and cached.

The engine builds one :class:`GrammarCompiler` per model (deriving llguidance's token trie from the HF
tokenizer takes seconds for a large vocabulary, so it is done once) and asks it for a
:class:`CompiledGrammar` per request: :meth:`GrammarCompiler.compile_async` returns a future from a
small thread pool (llguidance releases the GIL while it builds a grammar), and an LRU cache of those
futures makes a repeated spec (the same schema on every request of a client, the same tool schema)
free and lets concurrent requests with one spec share one compilation.

Why llguidance rather than xgrammar: it refuses the JSON-schema keywords it does not implement with an
error that names them, where xgrammar drops some of them silently and lets output violate the schema;
its compile time does not grow with the vocabulary; it reads GBNF as well as Lark. The measurements
are in docs/structured_outputs.md.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf

from llmserve.structured_output.grammar_tokens import named_stop_token
from llmserve.structured_output.matcher import CompiledGrammar
from llmserve.structured_output.spec import StructuredOutputError, StructuredOutputSpec

logger = logging.getLogger(__name__)

# Errors without llguidance's parser-state dump: the message goes back to the client.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)

_WHAT = {
    "json": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar",
}


def _grammar_text(spec: StructuredOutputSpec) -> str:
    """llguidance's description of the constraint (what its matcher compiles)."""
    if spec.kind in ("json", "json_object"):
        schema = spec.value if spec.kind == "json" else '{"type": "object"}'
        if not schema.lstrip().startswith("{"):
            # A boolean schema (the spec allows no other non-object): llguidance takes options for objects only.
            if not json.loads(schema):
                raise _error(spec, "Unsatisfiable schema: schema is false")
            schema = "{}"
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": spec.any_whitespace}
        )
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        # Lark string literals take JSON's escapes, so any option (quotes, newlines, unicode) is literal.
        alternatives = " | ".join(json.dumps(option, ensure_ascii=False) for option in spec.choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    try:
        return llguidance.grammar_from("grammar", spec.value)   # GBNF/EBNF is converted, Lark passes as is
    except ValueError as exc:
        raise _error(spec, str(exc)) from None


def validate_spec(spec: StructuredOutputSpec, tokenizer: llguidance.LLTokenizer | None = None) -> None:
    """Raise :class:`StructuredOutputError` unless llguidance compiles ``spec``. Without ``tokenizer`` what
    depends on the vocabulary passes unchecked: a grammar's token ranges (``<[100-200]>``) and special tokens
    (``<|im_end|>``) are checked only against one."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(_grammar_text(spec), tokenizer,
                                                                            limits=_LIMITS)
    if is_error:
        raise _error(spec, messages[0])


def grammar_tokenizer(tokenizer: Any, vocab_size: int | None, eos_token_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of an HF tokenizer: its token trie over ``vocab_size`` ids (the logits' width; at least
    the tokenizer's), ``eos_token_ids`` the tokens that end a sequence."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TypeError("structured outputs need a fast (tokenizers-backed) Hugging Face tokenizer")
    if not eos_token_ids:
        raise ValueError("structured outputs need at least one EOS token id to end a grammar")
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab_size or 0, len(tokenizer)),
                                        eos_token=[int(t) for t in eos_token_ids])


class GrammarValidator:
    """Checks specs against one model's tokenizer as its engine will compile them, so that the front end
    answers 400 for what only the vocabulary decides: token ranges past it, special tokens it lacks, and a
    grammar that asks for an EOS token as output (the matcher allows EOS only where the grammar may end).
    Specs that passed are remembered (clients repeat their schemas); thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int | None, eos_token_ids: Sequence[int],
                 cache_size: int = 256) -> None:
        self._tokenizer = grammar_tokenizer(tokenizer, vocab_size, eos_token_ids)
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        self._stop_ids = frozenset(int(t) for t in eos_token_ids)
        self._passed: OrderedDict[StructuredOutputSpec, None] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def validate(self, spec: StructuredOutputSpec) -> None:
        with self._lock:
            if spec in self._passed:
                self._passed.move_to_end(spec)
                return
        validate_spec(spec, self._tokenizer)
        if spec.kind == "grammar":
            stop = named_stop_token(_grammar_text(spec), self._vocab.get, self._stop_ids)
            if stop is not None:
                raise _error(spec, f"it names the end-of-sequence token {stop} as output; a constrained output "
                                   "ends with that token where its grammar ends, without the grammar asking for it")
        with self._lock:
            self._passed[spec] = None
            if len(self._passed) > self._cache_size:
                self._passed.popitem(last=False)


def _error(spec: StructuredOutputSpec, message: str) -> StructuredOutputError:
    return StructuredOutputError(f"the {_WHAT[spec.kind]} cannot be compiled: {_summary(spec, message)}")


def _summary(spec: StructuredOutputSpec, message: str) -> str:
    """llguidance's first line and its ``error:`` lines: the cause, without the echo of the Lark text
    it wraps a regex, a choice or a schema in (whose positions mean nothing to the client)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or ["unknown error"]
    first = lines[0].rstrip(":")
    if spec.kind != "grammar":
        first = re.sub(r"^at \d+\(\d+\): ", "", first)
    causes = [line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")]
    return ": ".join([first, *causes])


class GrammarCompiler:
    """Compiles :class:`StructuredOutputSpec` into :class:`CompiledGrammar` for one tokenizer.

    ``vocab_size`` is the model's (its logits' width), which may exceed the tokenizer's: the ids past
    the tokenizer are never allowed. ``eos_token_ids`` are the tokens that end a sequence (the model's
    generation config may list several); a grammar allows them exactly where it may end. Thread-safe.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        *,
        cache_size: int = 256,
        max_workers: int = 2,
    ) -> None:
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self._tokenizer = grammar_tokenizer(tokenizer, vocab_size, eos_token_ids)
        # A model vocabulary smaller than the tokenizer's only drops ids the model never produces; the
        # bitmask keeps the tokenizer's width and the logits' width bounds what is applied.
        self.vocab_size = max(vocab_size or 0, len(tokenizer))
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputSpec, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")

    def compile_async(self, spec: StructuredOutputSpec) -> Future[CompiledGrammar]:
        """A future of the compiled grammar; raises :class:`StructuredOutputError` from ``result()`` if the
        spec does not compile. Failures are cached too: the same bad spec fails again at no cost."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """Blocking :meth:`compile_async` (for tests and the offline API)."""
        return self.compile_async(spec).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        template = llguidance.LLMatcher(self._tokenizer, _grammar_text(spec), log_level=0, limits=_LIMITS)
        if template.is_error():
            raise _error(spec, template.get_error())
        for warning in template.get_grammar_warnings():
            logger.warning("structured output %s: %s", spec.kind, warning)
        return CompiledGrammar(spec, template, self.eos_token_ids, self.vocab_size)
