"""Structured outputs over HTTP with the official ``openai`` client (server started with
``--structured-outputs-config '{"backend": "guidance", "disable_any_whitespace": true}'``, so JSON is compact
and a random-weight model cannot wander off into whitespace).

* ``response_format`` ``json_schema`` (with ``strict``) and ``json_object`` on chat and on completions,
  streamed or not: the text is JSON valid under the schema (an object for ``json_object``), ``finish_reason``
  ``"stop"``, and the streamed text equals the non-streamed one (greedy).
* vLLM's ``structured_outputs`` (``regex``, ``choice``, ``grammar``) through ``extra_body``, and the legacy
  ``guided_choice``, on both endpoints.
* A constraint that is malformed or does not compile (a JSON-schema keyword llguidance does not implement,
  an unbalanced regex, a GBNF grammar with an undefined rule), two constraints at once, an option vLLM has
  and llmserve does not, ``ignore_eos`` with a constraint: 400 with ``param`` the request field and the
  problem (and where in the field) in the message.
* Without llguidance installed, a constrained request is a 400 saying how to install it.
"""

from __future__ import annotations

import json
import re
import sys

import openai
import pytest

from llmserve.entrypoints.openai.protocol import ChatCompletionRequest
from llmserve.structured_output import StructuredOutputError
from llmserve.structured_output import spec as spec_module

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
PROMPT = "A person, as JSON:"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
JSON_OBJECT = {"type": "json_object"}


@pytest.fixture(scope="module")
def client(start_server) -> openai.OpenAI:
    server = start_server("--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}')
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def close_brace(llama_dir) -> str:
    """The token id of "}", biased up so that any-JSON-object output closes at once instead of rambling."""
    from transformers import AutoTokenizer

    return str(AutoTokenizer.from_pretrained(llama_dir).convert_tokens_to_ids("}"))


def chat(client: openai.OpenAI, stream: bool, **kwargs) -> tuple[str, str]:
    """(text, finish_reason) of a greedy chat completion."""
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=100,
                                              stream=stream, **kwargs)
    if not stream:
        return response.choices[0].message.content, response.choices[0].finish_reason
    text, finish = "", None
    for chunk in response:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def complete(client: openai.OpenAI, stream: bool, **kwargs) -> tuple[str, str]:
    """(text, finish_reason) of a greedy completion."""
    response = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=100, stream=stream,
                                         **kwargs)
    if not stream:
        return response.choices[0].text, response.choices[0].finish_reason
    text, finish = "", None
    for chunk in response:
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("response_format", [JSON_SCHEMA, JSON_OBJECT], ids=["json_schema", "json_object"])
def test_response_format_streamed_or_not(client, close_brace, endpoint, response_format):
    run = chat if endpoint == "chat" else complete
    extra = {"logit_bias": {close_brace: 20}} if response_format is JSON_OBJECT else {}
    # The openai client takes response_format for chat only; completions get it as an extra field (as vLLM).
    kwargs = ({"response_format": response_format, **extra} if endpoint == "chat"
              else {"extra_body": {"response_format": response_format}, **extra})
    text, finish = run(client, False, **kwargs)
    assert (text, finish) == run(client, True, **kwargs)
    assert finish == "stop"
    value = json.loads(text)
    if response_format is JSON_SCHEMA:
        jsonschema.validate(value, SCHEMA)
    else:
        assert isinstance(value, dict)


REGEX = r"[A-Z][a-z]{1,5} [0-9]{2}"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("extra_body, valid", [
    ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t)),
    ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
    ({"structured_outputs": {"grammar": 'root ::= "(" [a-c] ("+" [a-c])? ")"'}},
     lambda t: re.fullmatch(r"\([a-c](\+[a-c])?\)", t)),
    ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
], ids=["regex", "choice", "grammar", "guided_choice"])
def test_vllm_structured_outputs_through_extra_body(client, endpoint, extra_body, valid):
    text, finish = (chat if endpoint == "chat" else complete)(client, False, extra_body=extra_body)
    assert valid(text), text
    assert finish == "stop"


@pytest.mark.parametrize("body, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format", "response_format.json_schema.schema: "
                                                                     "the JSON schema cannot be compiled"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "response_format.json_schema"),
    ({"structured_outputs": {"regex": "(a|b"}}, "structured_outputs", "structured_outputs.regex: the regex cannot"),
    ({"structured_outputs": {"grammar": "root ::= item"}}, "structured_outputs", "Rule 'item' not found"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "at most one of"),
    ({"guided_choice": ["a"], "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    # what only the model's vocabulary decides: checked by the front end against its tokenizer
    ({"structured_outputs": {"grammar": "start: <[99999999-100000000]>"}}, "structured_outputs",
     "Token range end too large"),
    ({"guided_grammar": 'start: "a" <|no_such_token|>'}, "structured_outputs", "unknown special token"),
    ({"guided_grammar": 'start: "a" </s>'}, "structured_outputs", "names the end-of-sequence token"),
], ids=["unimplemented-keyword", "json_schema-missing", "bad-regex", "bad-grammar", "two-constraints",
        "unsupported-option", "guided_json-not-json", "two-forms", "ignore_eos", "token-range", "special-token", "eos-as-output"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bad_constraints_are_400_naming_the_field(client, endpoint, body, param, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, extra_body=body)
        else:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, extra_body=body)
    assert info.value.status_code == 400 and info.value.param == param, info.value.body
    assert fragment in info.value.body["message"], info.value.body


def test_without_llguidance_a_constraint_is_400_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)   # import llguidance now fails
    monkeypatch.delitem(sys.modules, "llmserve.structured_output.compiler", raising=False)
    spec_module._validate.cache_clear()
    body = ChatCompletionRequest(messages=MESSAGES, structured_outputs={"regex": "[0-9]+"})
    with pytest.raises(StructuredOutputError, match=re.escape("pip install 'llmserve[structured]'")) as info:
        body.sampling_params(5, None)
    assert info.value.param == "structured_outputs"
    spec_module._validate.cache_clear()
