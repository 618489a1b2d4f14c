"""The grammars of ``tool_choice: "auto"`` with strict tools, run by llguidance over each format's model's
tokenizer (the tiny checkpoints', where the markers are plain text, and one whose markers are special tokens):

* text that is no call is free, and so is content before a format's first call, added tokens in it too (Qwen3's
  ``<think>``);
* calls in the format are accepted when they name a tool and a strict tool's arguments match its schema, in
  the variants the parser reads (Hermes' keys in either order, Mistral's whitespace and call ids); another
  name, arguments outside the schema, or text after the calls are not;
* a marker is taken as its token or spelled out (as the parser finds it in the text): either way the calls
  that follow are held to the schemas;
* a tool without ``strict`` takes any JSON object; ``parallel_tool_calls: false`` allows one call;
* with a JSON ``response_format``, the output is that JSON (compact where the constraint says so) or calls, with
  nothing but whitespace before them; Llama 3's format, whose calls are JSON answers, has no such grammar;
* the parsers of those formats give the grammar; pythonic has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
from llmserve.entrypoints.openai.tool_parsers.strict import Vocabulary, answer_rule

llguidance = pytest.importorskip("llguidance")
llguidance_hf = pytest.importorskip("llguidance.hf")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "strict": True,
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]


def _hermes(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# parser -> (family whose tokenizer writes it, [(output, accepted)])
CASES = {
    "hermes": ("qwen2", [
        ("Just text, no call.", True),
        ("Let me check." + _hermes("get_weather", {"city": "Paris", "days": 2}), True),
        ('<tool_call>\n{"arguments": {"zone": "CET"}, "name": "get_time"}\n</tool_call>', True),
        (_hermes("get_time", {"zone": "UTC"}) + "\n" + _hermes("get_weather", {"city": "Rome", "days": 1}), True),
        (_hermes("get_weather", {"city": "Oslo", "days": 2}), False),
        (_hermes("get_date", {}), False),
        (_hermes("get_time", {"zone": "UTC"}) + " and more text", False),
    ]),
    "mistral": ("mistral", [
        ("A plain answer.", True),
        ('Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}]', True),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 1}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', True),
        ('[TOOL_CALLS] get_weather [ARGS] {"city": "Rome", "days": 1}\n[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
         True),
        ('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}, "id": "a1b2c3d4e"}]', True),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 9}', False),
        ('[TOOL_CALLS]get_date[ARGS]{}', False),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"zone": "CET"}}]', False),
    ]),
    "llama3_json": ("llama3", [
        ("It is sunny.", True),
        ('text, then {"name": 1}', True),
        ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', True),
        ('  <|python_tag|> {"name": "get_time", "parameters": {"zone": "UTC"}}', True),
        ('{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", "parameters": '
         '{"city": "Paris", "days": 3}}', True),
        ('{"name": "get_time", "parameters": {"zone": "PST"}}', False),
        (' {"any": 1}', False),
        ('\r{"name": "get_time", "parameters": {"zone": "PST"}}', False),   # the parser skips \r too
        ('<|python_tag|> hello', False),
    ]),
}


def _accepts(tokenizer, grammar: str, text: str | list[int]) -> bool:
    """Whether llguidance lets the model write ``text`` (or these token ids) under ``grammar`` and stop there."""
    matcher = llguidance.LLMatcher(
        llguidance_hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id]),
        grammar)
    ids = tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else text
    consumed = matcher.consume_tokens(ids)
    return consumed and not matcher.is_error() and matcher.is_accepting()


def _tokenizer(checkpoint_dir, family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir(family))


def _grammar(parser: str, tokenizer, tools=TOOLS, max_calls=None, answer=None) -> str:
    return TOOL_CALL_PARSERS[parser]().strict_grammar(tools, max_calls, Vocabulary.of(tokenizer), answer)


@pytest.mark.parametrize("parser", sorted(CASES))
def test_free_text_and_calls_in_the_format_with_valid_arguments_are_accepted(checkpoint_dir, parser):
    family, cases = CASES[parser]
    tokenizer = _tokenizer(checkpoint_dir, family)
    grammar = _grammar(parser, tokenizer)
    assert [(text, _accepts(tokenizer, grammar, text)) for text, _ in cases] == cases


VERDICT = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no"]}}, "required": ["verdict"],
           "additionalProperties": False}
MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}


@pytest.mark.parametrize("parser", sorted(MARKERS))
def test_with_a_json_answer_an_output_without_calls_is_that_json(checkpoint_dir, parser):
    """The format's cases again: those starting with calls are judged as before, free text is now refused (before
    calls too); the answer is JSON under its schema, with the whitespace the constraint allows. (Judged on qwen2's
    byte-level tokens: a sentencepiece tokenizer would spell each text with a leading space.)"""
    cases = CASES[parser][1]
    tokenizer = _tokenizer(checkpoint_dir, "qwen2")
    grammar = _grammar(parser, tokenizer, answer=answer_rule(json.dumps(VERDICT), True))
    expected = [(text, accepted and text.startswith(MARKERS[parser])) for text, accepted in cases]
    assert [(text, _accepts(tokenizer, grammar, text)) for text, _ in cases] == expected
    assert any(accepted for _, accepted in expected)
    assert _accepts(tokenizer, grammar, "\n" + cases[2][0]) and cases[2][0].startswith(MARKERS[parser])
    assert _accepts(tokenizer, grammar, '{"verdict": "yes"}') and _accepts(tokenizer, grammar, '{"verdict":"no"}')
    assert not _accepts(tokenizer, grammar, '{"verdict": "maybe"}')
    compact = _grammar(parser, tokenizer, answer=answer_rule(json.dumps(VERDICT), False))
    assert _accepts(tokenizer, compact, '{"verdict":"no"}') and not _accepts(tokenizer, compact, '{"verdict": "no"}')
    own = _grammar(parser, tokenizer, answer=answer_rule(json.dumps({**VERDICT, "x-guidance": {
        "whitespace_flexible": False}}), True))   # the schema's own options win
    assert not _accepts(tokenizer, own, '{"verdict": "no"}')
    odd = _grammar(parser, tokenizer, answer=answer_rule(json.dumps({**VERDICT, "x-guidance": None}), True))
    assert _accepts(tokenizer, odd, '{"verdict": "no"}')
    anything = _grammar(parser, tokenizer, answer=answer_rule("true", True))
    assert _accepts(tokenizer, anything, "[1, 2]") and not _accepts(tokenizer, anything, "It is sunny.")


def test_llama3_json_has_no_grammar_with_a_json_answer(checkpoint_dir):
    tokenizer = _tokenizer(checkpoint_dir, "llama3")
    assert _grammar("llama3_json", tokenizer, answer=answer_rule(json.dumps(VERDICT), True)) is None


def test_a_tool_without_strict_takes_any_object_and_one_call_is_allowed_without_parallel_calls(checkpoint_dir):
    tokenizer = _tokenizer(checkpoint_dir, "qwen2")
    loose = {"type": "function", "function": {**WEATHER["function"], "strict": None}}
    assert _accepts(tokenizer, _grammar("hermes", tokenizer, [loose, TIME]),
                    _hermes("get_weather", {"city": "Oslo", "days": "many"}))
    assert not _accepts(tokenizer, _grammar("hermes", tokenizer, [loose, TIME]), _hermes("get_time", {"zone": "X"}))
    single = _grammar("hermes", tokenizer, max_calls=1)
    one = _hermes("get_time", {"zone": "UTC"})
    assert _accepts(tokenizer, single, one) and not _accepts(tokenizer, single, one + "\n" + one)


@pytest.mark.parametrize("special", [False, True], ids=["added-as-Qwen", "special-as-Hermes-2-Pro"])
def test_markers_held_as_tokens_are_taken_as_tokens_or_text(checkpoint_dir, tmp_path, special):
    """Qwen holds ``<tool_call>`` and ``<think>`` as added tokens (not special; llguidance still matches them as
    tokens), Hermes 2 Pro as special ones: the marker token starts the calls, reasoning between ``<think>`` tokens
    is free text, and the marker spelled in plain tokens starts calls held to the schemas as well (the parser
    finds it in the text either way)."""
    plain = _tokenizer(checkpoint_dir, "qwen2")
    spelled = plain.encode("<tool_call>", add_special_tokens=False)
    tokenizer = _tokenizer(checkpoint_dir, "qwen2")
    tokenizer.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"], special_tokens=special)
    tokenizer.save_pretrained(tmp_path)
    tokenizer = _tokenizer(lambda _: Path(tmp_path), "")
    assert len(tokenizer.encode("<tool_call>", add_special_tokens=False)) == 1
    grammar = _grammar("hermes", tokenizer)
    assert f"<[{tokenizer.convert_tokens_to_ids('<tool_call>')}]>" in grammar
    call = _hermes("get_weather", {"city": "Paris", "days": 2})
    oslo = _hermes("get_weather", {"city": "Oslo", "days": 2})
    assert _accepts(tokenizer, grammar, "<think>\nThe weather, then.\n</think>\n\nLet me check." + call)
    assert _accepts(tokenizer, grammar, "<think>\nNo tool needed.\n</think>\n\nIt is sunny.")
    assert not _accepts(tokenizer, grammar, "Let me check." + oslo)
    after_marker = tokenizer.encode(oslo.removeprefix("<tool_call>"), add_special_tokens=False)
    assert _accepts(tokenizer, grammar, spelled + tokenizer.encode(call.removeprefix("<tool_call>"),
                                                                   add_special_tokens=False))
    assert not _accepts(tokenizer, grammar, spelled + after_marker)


@pytest.mark.parametrize("parser,family,markers,call,outside", [
    ("mistral", "mistral", ["[TOOL_CALLS]", "[ARGS]", "[THINK]"], '[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}',
     '[TOOL_CALLS]get_time[ARGS]{"zone": "PST"}'),
    ("llama3_json", "llama3", ["<|python_tag|>"], '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}',
     '<|python_tag|>{"name": "get_time", "parameters": {"zone": "PST"}}')])
def test_special_token_markers_of_the_other_formats(checkpoint_dir, tmp_path, parser, family, markers, call, outside):
    """Mistral's control tokens and Llama 3's ``<|python_tag|>`` as special tokens: a call after the token is held
    to the schema, and other special tokens (Magistral's ``[THINK]``) may stand in free text."""
    tokenizer = _tokenizer(checkpoint_dir, family)
    tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.save_pretrained(tmp_path)
    tokenizer = _tokenizer(lambda _: Path(tmp_path), "")
    grammar = _grammar(parser, tokenizer)
    assert _accepts(tokenizer, grammar, call) and not _accepts(tokenizer, grammar, outside)
    if parser == "mistral":
        assert _accepts(tokenizer, grammar, "[THINK]hmm[THINK] A plain answer.")


def test_the_pythonic_format_has_no_strict_grammar():
    assert TOOL_CALL_PARSERS["pythonic"]().strict_grammar(TOOLS, None, Vocabulary({}, frozenset())) is None
