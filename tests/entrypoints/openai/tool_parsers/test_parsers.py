"""Each ``--tool-call-parser`` format, and the forced formats of ``tool_choice`` required / named.

For every format, on the outputs its models write: plain content passes through; calls are found with
their names and their arguments as JSON text; content before the calls is kept where the format allows
it; several calls come out in order; a call that is started and botched leaves the whole text as content
at the end. And the streaming property every parser must have: fed the text a few characters at a time,
the content and each call's arguments only grow, and what they grow into is the final parse.
"""

from __future__ import annotations

import json

import pytest

from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
from llmserve.entrypoints.openai.tool_parsers.forced import (
    NamedToolParser, RequiredToolParser, named_schema, required_schema)

WEATHER = {"city": "Paris", "days": [1, 2], "unit": None, "exact": True}
TIME = {"zone": "CET"}

# (parser, text, content, [(name, arguments)])
CASES = [
    ("hermes", "Hello there.", "Hello there.", []),
    ("hermes", 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER)
     + '}\n</tool_call>', "Let me look.", [("get_weather", WEATHER)]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n<tool_call>\n'
     '{"arguments": {"zone": "CET"}, "name": "get_time"}', "", [("get_weather", {"city": "Paris"}),
                                                               ("get_time", TIME)]),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "", [("f", {"a": 1})]),
    ("hermes", "<tool_call>{oops}</tool_call>", "<tool_call>{oops}</tool_call>", []),
    # arguments are a JSON object or the call is botched (OpenAI's clients json.loads them into keyword arguments)
    ("hermes", '<tool_call>{"name": "f", "arguments": 5}</tool_call>', '<tool_call>{"name": "f", "arguments": 5}'
     '</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>', '<tool_call>{"name": "f", "arguments": '
     '"[1]"}</tool_call>', []),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}", "",
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "parameters": {"zone": "CET"}}', "", [("get_weather", {"city": "Paris"}),
                                                                ("get_time", TIME)]),
    ("llama3_json", '{"city": "Paris"}', '{"city": "Paris"}', []),
    ("mistral", "Bonjour.", "Bonjour.", []),
    ("mistral", 'Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) + ', "id": "a1"}, '
     '{"name": "get_time", "arguments": {"zone": "CET"}}]', "Sure.", [("get_weather", WEATHER),
                                                                     ("get_time", TIME)]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', "",
     [("get_weather", {"city": "Paris"}), ("get_time", TIME)]),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]{", "[TOOL_CALLS]get_weather[ARGS]{", []),
    ("pythonic", "It is sunny.", "It is sunny.", []),
    ("pythonic", '[get_weather(city="Paris", days=[1, 2], unit=None, exact=True), get_time(zone=\'CET\')]', "",
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("pythonic", '<|python_start|>[get_time(zone="CET")]<|python_end|>', "", [("get_time", TIME)]),
    ("pythonic", "[get_time(zone=os.environ)]", "[get_time(zone=os.environ)]", []),
    ("pythonic", "[1, 2, 3]", "[1, 2, 3]", []),
]


def _calls(parsed):
    return [(call.name, json.loads(call.arguments)) for call in parsed.calls]


@pytest.mark.parametrize("name,text,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_final_parse(name, text, content, calls):
    parsed = TOOL_CALL_PARSERS[name]().parse(text, final=True)
    assert parsed.content == content
    assert _calls(parsed) == calls


@pytest.mark.parametrize("name,text,content,calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_prefix_parses_only_grow_into_the_final_parse(name, text, content, calls, step):
    parser = TOOL_CALL_PARSERS[name]()
    final = parser.parse(text, final=True)
    for cut in range(0, len(text), step):
        partial = parser.parse(text[:cut], final=False)
        assert final.content.startswith(partial.content), (cut, partial)
        if final.calls:
            assert len(partial.calls) <= len(final.calls)
            for seen, done in zip(partial.calls, final.calls):
                assert seen.name in (None, done.name)
                assert done.arguments.startswith(seen.arguments), (cut, seen)


@pytest.mark.parametrize("name,marker", [("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]")])
def test_a_marker_still_forming_is_held_back_not_shown_as_content(name, marker):
    parser = TOOL_CALL_PARSERS[name]()
    assert parser.parse("Sure." + marker[:4], final=False).content == "Sure."
    assert parser.parse("Sure." + marker[:4], final=True).content == "Sure." + marker[:4]


def test_markers_that_are_special_tokens_ask_for_special_tokens_in_the_text():
    assert {name for name, cls in TOOL_CALL_PARSERS.items() if cls.needs_special_tokens} == {
        "hermes", "llama3_json", "mistral"}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time"}}]


def test_required_schema_is_an_array_of_calls_each_valid_for_its_tool():
    jsonschema = pytest.importorskip("jsonschema")
    schema = required_schema(TOOLS, parallel=True)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}},
                         {"name": "get_time", "parameters": {}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}],
                [{"parameters": {}, "name": "get_time", "extra": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert required_schema(TOOLS, parallel=False)["maxItems"] == 1
    assert named_schema(TOOLS[0]) == TOOLS[0]["function"]["parameters"]
    assert named_schema(TOOLS[1]) == {"type": "object"}


def test_forced_parsers():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    assert _calls(RequiredToolParser().parse(text, final=True)) == [("get_weather", {"city": "Paris"}),
                                                                     ("get_time", {})]
    truncated = RequiredToolParser().parse(text[:30], final=True)   # cut by max_tokens: still the call
    assert truncated.content == "" and [(c.name, c.arguments) for c in truncated.calls] == [("get_weather", "")]
    assert RequiredToolParser().parse(text[:5], final=True).content == text[:5]   # cut before any name
    named = NamedToolParser("get_weather").parse(' {"city": "Paris"}', final=True)
    assert named.content == "" and _calls(named) == [("get_weather", {"city": "Paris"})]
    assert NamedToolParser("get_weather").parse('{"city": "Par', final=False).calls[0].arguments == '{"city": "Par'
