"""A spec is plain data that travels as msgpack and keys a cache; a malformed one, or a request field the
server cannot honour, is refused with an error that names the problem (and the request field)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import msgspec
import pytest

from llmserve.errors import InvalidRequestError
from llmserve.structured_output import StructuredOutputError
from llmserve.structured_output import StructuredOutputSpec as Spec

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


@dataclass
class ParamsWithSpec:
    """Stands for SamplingParams once it has the field (a dataclass msgspec encodes)."""

    n: int = 1
    structured_outputs: Spec | None = None


@pytest.mark.parametrize("spec", [
    Spec.json_schema(SCHEMA),
    Spec.json_schema(True, any_whitespace=False),
    Spec.json_object(),
    Spec.regex(r"\d+"),
    Spec.choice(["yes", "no", 'é "x"']),
    Spec.grammar('root ::= "a"'),
], ids=lambda spec: spec.kind)
def test_round_trips_as_msgpack_equal_and_hashing_equal(spec):
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=Spec)
    assert decoded == spec and hash(decoded) == hash(spec)
    encoded = msgspec.msgpack.encode(ParamsWithSpec(structured_outputs=spec))
    params = msgspec.msgpack.decode(encoded, type=ParamsWithSpec)
    assert params.structured_outputs == spec
    assert copy.deepcopy(params).structured_outputs == spec


def test_schema_keeps_its_key_order():
    # The order of properties in the schema is the order the output follows.
    assert list(msgspec.json.decode(Spec.json_schema(SCHEMA).value)["properties"]) == ["b", "a"]
    assert Spec.json_schema(SCHEMA) == Spec.json_schema('{"type": "object", "properties": '
                                                       '{"b": {"type": "integer"}, "a": {"type": "string"}}}')


def test_errors_are_request_errors():
    assert issubclass(StructuredOutputError, InvalidRequestError)
    assert issubclass(StructuredOutputError, ValueError)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Spec.json_schema('{"type": "object",}'), "not valid JSON: Expecting property name"),
    (lambda: Spec.json_schema("[1, 2]"), "must be a JSON object (or a boolean), got an array"),
    (lambda: Spec.json_schema({"default": float("nan")}), "cannot be serialised as JSON"),
    (lambda: Spec.choice([]), "at least one option"),
    (lambda: Spec.choice(["a", 3]), "options must be strings, got int 3"),
    (lambda: Spec.choice("ab"), "must be a list of strings"),
    (lambda: Spec.regex(""), "regex must not be empty"),
    (lambda: Spec.grammar("  \n"), "grammar must not be empty"),
    (lambda: Spec("xml", "<a/>"), "unknown structured output kind 'xml'"),
    (lambda: Spec("json_object", "{}"), "takes no value"),
    (lambda: Spec("regex", "a", choices=("a",)), "takes no choices"),
    (lambda: Spec("regex", 5), "value must be a string, got int"),
])
def test_malformed_specs_are_refused_by_name(build, message):
    with pytest.raises(StructuredOutputError, match=re.escape(message)):
        build()


def test_malformed_spec_is_refused_when_decoded_too():
    with pytest.raises(msgspec.ValidationError, match="at least one option"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(["choice", "", [], True]), type=Spec)


# -- OpenAI response_format ------------------------------------------------------------------------

def test_response_format_maps_onto_specs():
    assert Spec.from_response_format(None) is None
    assert Spec.from_response_format({"type": "text"}) is None
    assert Spec.from_response_format({"type": "json_object"}) == Spec.json_object()
    body = {"name": "thing", "schema": SCHEMA, "strict": True}
    assert Spec.from_response_format({"type": "json_schema", "json_schema": body}) == Spec.json_schema(SCHEMA)
    # No schema: any JSON value, as the OpenAI API has it.
    assert Spec.from_response_format({"type": "json_schema", "json_schema": {"name": "x"}}) == Spec.json_schema({})


@pytest.mark.parametrize(("response_format", "param", "message"), [
    ({"type": "yaml"}, "response_format.type", "must be one of text, json_object, json_schema; got 'yaml'"),
    ({"type": "json_schema"}, "response_format.json_schema", "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}},
     "response_format.json_schema.strict", "strict must be a boolean"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}},
     "response_format.json_schema.schema", "must be a JSON object, got an array"),
    ({"type": "json_schema", "json_schema": {"schema": {"x": float("inf")}}},
     "response_format.json_schema.schema", "cannot be serialised"),
    ("json", "response_format", "must be an object"),
])
def test_bad_response_format_names_the_field(response_format, param, message):
    with pytest.raises(StructuredOutputError, match=re.escape(message)) as info:
        Spec.from_response_format(response_format)
    assert info.value.param == param


# -- vLLM structured_outputs -----------------------------------------------------------------------

def test_structured_outputs_map_onto_specs():
    assert Spec.from_structured_outputs(None) is None
    assert Spec.from_structured_outputs({"json": SCHEMA}) == Spec.json_schema(SCHEMA)
    assert Spec.from_structured_outputs({"json": '{"type": "integer"}'}) == Spec.json_schema({"type": "integer"})
    assert Spec.from_structured_outputs({"json": SCHEMA, "disable_any_whitespace": True}) == \
        Spec.json_schema(SCHEMA, any_whitespace=False)
    assert Spec.from_structured_outputs({"regex": "[a-z]+", "disable_fallback": True}) == Spec.regex("[a-z]+")
    assert Spec.from_structured_outputs({"choice": ["a", "b"]}) == Spec.choice(["a", "b"])
    assert Spec.from_structured_outputs({"grammar": 'root ::= "x"'}) == Spec.grammar('root ::= "x"')
    assert Spec.from_structured_outputs({"json_object": True, "regex": None}) == Spec.json_object()


@pytest.mark.parametrize(("params", "param", "message"), [
    ({"json": SCHEMA, "regex": "a"}, "structured_outputs",
     "exactly one of json, regex, choice, grammar, json_object; got json, regex"),
    ({}, "structured_outputs", "got none"),
    ({"choice": []}, "structured_outputs.choice", "at least one option"),
    ({"json": [1]}, "structured_outputs.json", "must be a JSON schema (an object or its JSON text), got an array"),
    ({"json": "{oops"}, "structured_outputs.json", "not valid JSON"),
    ({"regex": 5}, "structured_outputs.regex", "must be a string"),
    ({"json_object": "yes"}, "structured_outputs.json_object", "must be true"),
    ({"structural_tag": "{}"}, "structured_outputs.structural_tag", "not supported"),
    ({"regex": "a", "whitespace_pattern": " *"}, "structured_outputs.whitespace_pattern", "not supported"),
    ({"regex": "a", "disable_additional_properties": True},
     "structured_outputs.disable_additional_properties", "not supported"),
    ({"regex": "a", "schema": {}}, "structured_outputs", "unknown fields: schema"),
])
def test_bad_structured_outputs_name_the_field(params, param, message):
    with pytest.raises(StructuredOutputError, match=re.escape(message)) as info:
        Spec.from_structured_outputs(params)
    assert info.value.param == param
