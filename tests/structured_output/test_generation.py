"""Generation under a grammar always yields a valid output and ends cleanly at the grammar's end.

A random model (see conftest) samples under each constraint on both tokenizer kinds, until its matcher
terminates; the decoded text must then be valid: ``json.loads`` plus JSON-schema validation, ``re.fullmatch``
for a regex, membership for a choice, a parser for a grammar. The stop token comes last and only last.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llmserve.structured_output import GrammarBitmask, StructuredOutputSpec

from .conftest import decode, generate

SEEDS = [0, 1, 2]

POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100}, "y": {"type": "integer"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}

SCHEMAS = {
    "flat object of every scalar type": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "score": {"type": "number"},
            "active": {"type": "boolean"},
            "nothing": {"type": "null"},
        },
        "required": ["name", "age", "score", "active", "nothing"],
        "additionalProperties": False,
    },
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "address": {
                        "type": "object",
                        "properties": {
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                            "city": {"enum": ["Paris", "Oslo"]},
                        },
                        "required": ["zip", "city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "address"],
                "additionalProperties": False,
            },
            "version": {"const": 2},
        },
        "required": ["user", "version"],
        "additionalProperties": False,
    },
    "enum of mixed values": {"enum": ["red", "green", 42, None, True, "with \"quotes\""]},
    "array with min and max items": {"type": "array", "items": POINT, "minItems": 2, "maxItems": 3},
    "array of enums": {
        "type": "array",
        "items": {"enum": ["a", "b", "c"]},
        "minItems": 1,
        "maxItems": 5,
    },
    "string patterns and formats": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "day": {"type": "string", "format": "date"},
            "word": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]+$"},
        },
        "required": ["code", "day", "word"],
        "additionalProperties": False,
    },
    "numbers with bounds": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 999},
        },
        "required": ["ratio", "count"],
        "additionalProperties": False,
    },
    "optional properties": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"type": "integer", "maximum": 9}},
        "required": ["b"],
        "additionalProperties": False,
    },
    "anyOf and nullable types": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]},
            "note": {"type": ["string", "null"], "maxLength": 3},
        },
        "required": ["value", "note"],
        "additionalProperties": False,
    },
    "recursive $ref": {
        "$defs": {"node": {
            "type": "object",
            "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                           "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
            "required": ["v", "next"],
            "additionalProperties": False,
        }},
        "$ref": "#/$defs/node",
    },
    "empty object only": {"type": "object", "additionalProperties": False},
    "boolean or null": {"type": ["boolean", "null"]},
}

REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|maybe)",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
    r"-?[0-9]{1,4}(\.[0-9]{1,2})?",
    r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    r"(café|naïve|日本){1,2}",
    r"[^\n]{1,12}",
]

CHOICES = [
    ["positive", "negative", "neutral"],
    ["a", "ab", "abc"],                                  # each option a prefix of the next
    ['say "hi"', "back\\slash", "é ü", "new\nline"],     # quotes, escapes, unicode, newline
    ["", "x"],                                           # the empty output
]

ARITHMETIC_GBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= [0-9]{1,3} | "(" expr ")"
"""

KEY_VALUE_GBNF = r"""
root ::= "name: " [A-Za-z]{2,8} "\n" "age: " [0-9]{1,2}
"""

LIST_LARK = r"""
start: "[" item ("," item)* "]"
item: /[a-z]{1,5}/
"""


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _assert_clean_end(gen, grammar) -> None:
    """Terminated, and the stop token is the last token and the only one."""
    assert gen.terminated, f"no end within {len(gen.token_ids)} tokens: {gen.text[:200]!r}"
    assert gen.token_ids[-1] in grammar.stop_token_ids
    assert not grammar.stop_token_ids & set(gen.token_ids[:-1])


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_output_under_a_json_schema_is_valid_json_under_the_schema(family, tokenizers, compilers, name):
    schema = SCHEMAS[name]
    validator = _validator(schema)
    for any_whitespace in (True, False):
        grammar = compilers(family).compile(StructuredOutputSpec.json_schema(schema, any_whitespace=any_whitespace))
        for seed in SEEDS:
            gen = generate(grammar, tokenizers(family), seed)
            _assert_clean_end(gen, grammar)
            validator.validate(json.loads(gen.text))
            if not any_whitespace:
                outside_strings = re.sub(r'"(\\.|[^"\\])*"', '""', gen.text)
                assert not re.search(r"\s", outside_strings), gen.text


def test_json_object_mode_yields_a_json_object(family, tokenizers, compilers):
    grammar = compilers(family).compile(StructuredOutputSpec.json_object(any_whitespace=False))
    ended = 0
    for seed in range(6):
        # Free-form keys and strings make a random model's object arbitrarily long: check the ones that end.
        gen = generate(grammar, tokenizers(family), seed, max_tokens=300)
        if gen.terminated:
            ended += 1
            _assert_clean_end(gen, grammar)
            assert isinstance(json.loads(gen.text), dict)
    assert ended


@pytest.mark.parametrize("spec", [StructuredOutputSpec.json_object(),
                                  StructuredOutputSpec.json_schema({"type": "array", "items": {"type": "string"}})],
                         ids=["json_object", "array of free strings"])
def test_stop_token_is_allowed_exactly_where_the_output_parses(family, tokenizers, compilers, spec):
    """Checked at every step of an unbounded generation: EOS only at the grammar's end."""
    grammar = compilers(family).compile(spec)
    tokenizer = tokenizers(family)
    gen = generate(grammar, tokenizer, seed=3, max_tokens=120)
    tokens = gen.token_ids[:-1] if gen.terminated else gen.token_ids
    matcher = grammar.matcher()
    bitmask = GrammarBitmask(1, grammar.vocab_size, num_threads=1)
    eos = min(grammar.stop_token_ids)
    for i in range(len(tokens) + 1):
        bitmask.fill([matcher])
        eos_allowed = bool((int(bitmask.bitmask[0, eos // 32]) >> (eos % 32)) & 1)
        text = decode(tokenizer, tokens[:i])
        try:
            json.loads(text)
            parses = text.strip() != ""
        except ValueError:
            parses = False
        assert eos_allowed == parses, f"EOS {'allowed' if eos_allowed else 'refused'} after {text!r}"
        if i < len(tokens):
            assert matcher.accept_tokens([tokens[i]])


@pytest.mark.parametrize("pattern", REGEXES)
def test_output_under_a_regex_matches_it_fully(family, tokenizers, compilers, pattern):
    grammar = compilers(family).compile(StructuredOutputSpec.regex(pattern))
    for seed in SEEDS:
        gen = generate(grammar, tokenizers(family), seed)
        _assert_clean_end(gen, grammar)
        assert re.fullmatch(pattern, gen.text), gen.text


@pytest.mark.parametrize("options", CHOICES, ids=lambda options: "|".join(options))
def test_output_under_a_choice_is_one_of_the_options(family, tokenizers, compilers, options):
    grammar = compilers(family).compile(StructuredOutputSpec.choice(options))
    seen = set()
    for seed in range(8):
        gen = generate(grammar, tokenizers(family), seed)
        _assert_clean_end(gen, grammar)
        assert gen.text in options
        seen.add(gen.text)
    assert len(seen) > 1, "a random model should not always pick the same option"


def _is_arithmetic(text: str) -> bool:
    """Reduce innermost parenthesised expressions to a number until none is left."""
    expr = r"[0-9]{1,3}([+-][0-9]{1,3})*"
    while (reduced := re.sub(rf"\({expr}\)", "0", text)) != text:
        text = reduced
    return re.fullmatch(expr, text) is not None


@pytest.mark.parametrize(("grammar_text", "is_valid"), [
    (ARITHMETIC_GBNF, _is_arithmetic),
    (KEY_VALUE_GBNF, lambda text: re.fullmatch(r"name: [A-Za-z]{2,8}\nage: [0-9]{1,2}", text)),
    (LIST_LARK, lambda text: re.fullmatch(r"\[[a-z]{1,5}(,[a-z]{1,5})*\]", text)),
], ids=["gbnf arithmetic", "gbnf key-value", "lark list"])
def test_output_under_a_grammar_is_in_its_language(family, tokenizers, compilers, grammar_text, is_valid):
    grammar = compilers(family).compile(StructuredOutputSpec.grammar(grammar_text))
    for seed in SEEDS:
        gen = generate(grammar, tokenizers(family), seed)
        _assert_clean_end(gen, grammar)
        assert is_valid(gen.text), gen.text


def test_tokens_past_the_tokenizer_are_never_allowed(family, tokenizers, compilers):
    compiler = compilers(family)
    tokenizer = tokenizers(family)
    assert compiler.vocab_size > len(tokenizer)
    grammar = compiler.compile(StructuredOutputSpec.regex(r"[a-z ]{1,30}"))
    matcher = grammar.matcher()
    bitmask = GrammarBitmask(1, grammar.vocab_size, num_threads=1)
    for token in generate(grammar, tokenizer, seed=0).token_ids:
        bitmask.fill([matcher])
        allowed = [t for t in range(len(tokenizer), grammar.vocab_size)
                   if (int(bitmask.bitmask[0, t // 32]) >> (t % 32)) & 1]
        assert allowed == []
        assert matcher.accept_tokens([token])
