"""The compiler turns specs into grammars off the caller's thread, once per spec; a spec the library
cannot compile fails with an error that names the problem, with or without a tokenizer."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("llguidance")

from llmserve.structured_output import GrammarCompiler, StructuredOutputError
from llmserve.structured_output import StructuredOutputSpec as Spec

BAD_SPECS = [
    (Spec.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
     'the JSON schema cannot be compiled: Unimplemented keys: ["uniqueItems"]'),
    (Spec.json_schema({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
     'Unimplemented keys: ["if", "then"]'),
    (Spec.json_schema({"type": "strnig"}), "Invalid type: strnig"),
    (Spec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}),
     "Unsatisfiable schema: minimum (5) is greater than maximum (1)"),
    (Spec.json_schema({"type": "string", "format": "colour"}), "Unknown format: colour"),
    (Spec.json_schema({"$ref": "#/$defs/missing"}), "/$defs/missing"),
    (Spec.json_schema({"enum": []}), "Unsatisfiable schema"),
    (Spec.json_schema(False), "schema is false"),
    (Spec.regex("(a|b"),
     'the regex cannot be compiled: invalid regex "(a|b" (in regex): regex parse error: unclosed group'),
    (Spec.regex("(?=x)y"), "look-around, including look-ahead and look-behind, is not supported"),
    (Spec.regex("a{2,"), "invalid regex"),
    (Spec.grammar("root ::= item\n"),
     "the grammar cannot be compiled: Failed to convert the grammar from GBNF to Lark: Rule 'item' not found"),
    (Spec.grammar("start: item\n"), 'unknown name: "item"'),
    (Spec.grammar('root ::= "a" ('), "the grammar cannot be compiled"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_uncompilable_spec_fails_naming_the_problem(compilers, spec, message):
    with pytest.raises(StructuredOutputError, match=re.escape(message)):
        spec.validate()                                    # the API server's check: no tokenizer
    with pytest.raises(StructuredOutputError, match=re.escape(message)):
        compilers("llama").compile(spec)                   # the engine's compile
    assert compilers("llama").compile_async(spec).exception() is not None   # cached as failed


@pytest.mark.parametrize("spec", [
    Spec.json_schema({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}),
    Spec.json_schema({"oneOf": [{"type": "integer"}, {"type": "null"}], "title": "t", "description": "d"}),
    Spec.json_schema({"type": "string", "pattern": r"^\p{L}+$"}),
    Spec.json_object(),
    Spec.regex(r"(?i)hello \w+"),
    Spec.choice(["a", "b"]),
    Spec.grammar('root ::= "x" [0-9]+'),
    Spec.grammar('start: "x" /[0-9]+/'),
], ids=lambda spec: spec.kind)
def test_supported_specs_validate_and_compile(compilers, spec):
    spec.validate()
    assert compilers("llama").compile(spec).spec == spec


def test_compilation_is_cached_and_shared(compilers):
    compiler = compilers("llama")
    spec = Spec.regex("cached-[0-9]+")
    first = compiler.compile_async(spec)
    assert compiler.compile_async(Spec.regex("cached-[0-9]+")) is first     # equal specs share it
    assert compiler.compile_async(Spec.regex("cached-[0-9]*")) is not first
    assert first.result() is compiler.compile(spec)


def test_compiles_off_the_calling_thread_and_from_many_threads(compilers):
    compiler = compilers("qwen2")
    caller = threading.get_ident()
    specs = [Spec.json_schema({"type": "object", "properties": {f"p{i}": {"type": "integer"}}}) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        grammars = list(pool.map(lambda spec: compiler.compile_async(spec).result(), specs * 2))
    assert [g.spec for g in grammars] == specs * 2
    assert grammars[:12] == grammars[12:]                                      # the same objects
    assert compiler._pool._threads and caller not in {t.ident for t in compiler._pool._threads}


def test_cache_is_bounded_least_recently_used_first(tokenizers):
    compiler = GrammarCompiler(tokenizers("llama"), cache_size=2)
    try:
        a, b, c = (Spec.regex(x) for x in ("a+", "b+", "c+"))
        future_a = compiler.compile_async(a)
        compiler.compile_async(b)
        assert compiler.compile_async(a) is future_a                           # a is now the most recent
        compiler.compile_async(c)                                              # evicts b
        assert compiler.compile_async(a) is future_a
        assert list(compiler._cache) == [c, a]
    finally:
        compiler.shutdown()


def test_vocab_size_is_the_larger_of_the_model_and_the_tokenizer(tokenizers):
    tokenizer = tokenizers("llama")
    for vocab_size, expected in [(None, len(tokenizer)), (len(tokenizer) + 100, len(tokenizer) + 100),
                                 (len(tokenizer) - 10, len(tokenizer))]:
        compiler = GrammarCompiler(tokenizer, vocab_size=vocab_size)
        assert compiler.vocab_size == expected
        assert compiler.compile(Spec.regex("x")).vocab_size == expected
        compiler.shutdown()


def test_a_tokenizer_without_eos_needs_stop_tokens(tokenizers):
    tokenizer = tokenizers("qwen2")
    with pytest.raises(ValueError, match="at least one EOS token"):
        GrammarCompiler(tokenizer, eos_token_ids=[])
    with pytest.raises(TypeError, match="fast"):
        GrammarCompiler(object())


@pytest.mark.parametrize("grammar, message", [
    ("start: <[99999999-100000000]>", "Token range end too large"),
    ('start: "a" <|no_such_token|>', "unknown special token"),
    ('start: "a" <[{eos}]> "b"', "names the end-of-sequence token {eos} as output"),
    ('start: "a" {eos_text}', "names the end-of-sequence token {eos} as output"),
])
def test_the_validator_checks_what_only_the_vocabulary_decides(tokenizers, family, grammar, message):
    """The front end's check: what compiles without a tokenizer but not for this model is refused before the
    request is admitted (a grammar asking for EOS as output would find no token allowed after it)."""
    from llmserve.structured_output.compiler import GrammarValidator, validate_spec

    tokenizer = tokenizers(family)
    eos = tokenizer.eos_token_id
    spec = Spec.grammar(grammar.format(eos=eos, eos_text=tokenizer.eos_token))
    validate_spec(spec)   # passes without the vocabulary
    with pytest.raises(StructuredOutputError, match="the grammar cannot be compiled") as info:
        GrammarValidator(tokenizer, len(tokenizer), [eos]).validate(spec)
    assert message.format(eos=eos) in str(info.value)
    GrammarValidator(tokenizer, len(tokenizer), [eos]).validate(Spec.grammar('start: "a" <[3]>'))


def test_the_validator_remembers_the_specs_that_passed(tokenizers, monkeypatch):
    """A client's repeated schema is checked against the vocabulary once (the check runs where requests are
    admitted); a spec that failed is checked again."""
    import llmserve.structured_output.compiler as compiler

    calls = []
    real = compiler.validate_spec
    monkeypatch.setattr(compiler, "validate_spec", lambda spec, tok=None: calls.append(spec) or real(spec, tok))
    tokenizer = tokenizers("llama")
    validator = compiler.GrammarValidator(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    good, bad = Spec.regex("[ab]+"), Spec.grammar("start: <[99999999]>")
    for _ in range(3):
        validator.validate(good)
        with pytest.raises(StructuredOutputError):
            validator.validate(bad)
    assert calls.count(good) == 1 and calls.count(bad) == 3
