"""The grammars of ``tool_choice: "auto"`` with strict tools, run by llguidance over each format's model's
tokenizer (the tiny checkpoints', where the markers are plain text, and one whose markers are special tokens):

* text that is no call is free, and so is content before a format's first call;
* calls in the format are accepted when they name a tool and a strict tool's arguments match its schema;
  another name, arguments outside the schema, or text after the calls are not;
* a tool without ``strict`` takes any JSON object; ``parallel_tool_calls: false`` allows one call;
* the parsers of those formats give the grammar; pythonic has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
from llmserve.entrypoints.openai.tool_parsers.strict import special_token_ids

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
        (_hermes("get_time", {"zone": "UTC"}) + "\n" + _hermes("get_weather", {"city": "Rome", "days": 1}), True),
        (_hermes("get_weather", {"city": "Oslo", "days": 2}), False),
        (_hermes("get_date", {}), False),
        (_hermes("get_time", {"zone": "UTC"}) + " and more text", False),
    ]),
    "mistral": ("mistral", [
        ("A plain answer.", True),
        ('Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}]', True),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", "days": 1}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', True),
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
        ('<|python_tag|> hello', False),
    ]),
}


def _accepts(tokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(
        llguidance_hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id]),
        grammar)
    consumed = matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
    return consumed and not matcher.is_error() and matcher.is_accepting()


def _tokenizer(checkpoint_dir, family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir(family))


def _grammar(parser: str, tokenizer, tools=TOOLS, max_calls=None) -> str:
    return TOOL_CALL_PARSERS[parser]().strict_grammar(tools, max_calls, special_token_ids(tokenizer))


@pytest.mark.parametrize("parser", sorted(CASES))
def test_free_text_and_calls_in_the_format_with_valid_arguments_are_accepted(checkpoint_dir, parser):
    family, cases = CASES[parser]
    tokenizer = _tokenizer(checkpoint_dir, family)
    grammar = _grammar(parser, tokenizer)
    assert [(text, _accepts(tokenizer, grammar, text)) for text, _ in cases] == cases


def test_a_tool_without_strict_takes_any_object_and_one_call_is_allowed_without_parallel_calls(checkpoint_dir):
    tokenizer = _tokenizer(checkpoint_dir, "qwen2")
    loose = {"type": "function", "function": {**WEATHER["function"], "strict": None}}
    assert _accepts(tokenizer, _grammar("hermes", tokenizer, [loose, TIME]),
                    _hermes("get_weather", {"city": "Oslo", "days": "many"}))
    assert not _accepts(tokenizer, _grammar("hermes", tokenizer, [loose, TIME]), _hermes("get_time", {"zone": "X"}))
    single = _grammar("hermes", tokenizer, max_calls=1)
    one = _hermes("get_time", {"zone": "UTC"})
    assert _accepts(tokenizer, single, one) and not _accepts(tokenizer, single, one + "\n" + one)


def test_markers_that_are_special_tokens_are_matched_as_those_tokens(checkpoint_dir, tmp_path):
    """Hermes 2 Pro holds ``<tool_call>`` and ``</tool_call>`` as special tokens: the grammar takes the tokens
    (which free text cannot contain), and the markers spelled out in plain text are then just text."""
    tokenizer = _tokenizer(checkpoint_dir, "qwen2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    tokenizer.save_pretrained(tmp_path)
    tokenizer = _tokenizer(lambda _: Path(tmp_path), "")
    special = special_token_ids(tokenizer)
    assert special("<tool_call>") is not None and special("get_weather") is None
    grammar = _grammar("hermes", tokenizer)
    assert f"<[{special('<tool_call>')}]>" in grammar
    call = _hermes("get_weather", {"city": "Paris", "days": 2})
    assert len(tokenizer.encode("<tool_call>", add_special_tokens=False)) == 1
    assert _accepts(tokenizer, grammar, "Let me check." + call)
    assert not _accepts(tokenizer, grammar, "Let me check." + _hermes("get_weather", {"city": "Oslo", "days": 2}))
    assert _accepts(tokenizer, grammar, "Just text.")


def test_the_pythonic_format_has_no_strict_grammar():
    assert TOOL_CALL_PARSERS["pythonic"]().strict_grammar(TOOLS, None, lambda text: None) is None
