"""The partial-JSON scanner: in any prefix of an object, the complete keys with where their values start
and (when finished) end; strings with escaped quotes and braces do not end a value; malformed text stops
the scan without inventing fields."""

from __future__ import annotations

import json

import pytest

from llmserve.entrypoints.openai.tool_parsers.json_scan import scan_array_of_objects, scan_object, value_end

OBJECT = '{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "days": [1, {"x": 2}]}, "n": 12}'


def test_a_complete_object_has_every_field_with_its_raw_value():
    obj = scan_object(OBJECT, 0)
    assert obj.end == len(OBJECT)
    assert {key: span.raw(OBJECT) for key, span in obj.fields.items()} == {
        "name": '"get_weather"', "arguments": '{"city": "Pa\\"ris}", "days": [1, {"x": 2}]}', "n": "12"}
    assert obj.value(OBJECT, "arguments") == json.loads(OBJECT)["arguments"]


@pytest.mark.parametrize("cut", range(1, len(OBJECT)))
def test_every_prefix_shows_only_what_is_complete_and_growing_values_as_prefixes(cut):
    text = OBJECT[:cut]
    obj = scan_object(text, 0)
    final = scan_object(OBJECT, 0)
    assert obj.end is None
    for key, span in obj.fields.items():
        assert final.fields[key].raw(OBJECT).startswith(span.raw(text))
        if span.end is not None:
            assert span.raw(text) == final.fields[key].raw(OBJECT)
    # a bare number at the very end is never taken as finished: more digits may come
    assert "n" not in obj.fields or obj.fields["n"].end is None


def test_value_end_of_each_kind():
    assert value_end('"a\\"b" x', 0) == 6
    assert value_end("[1, [2]], 3", 0) == 8
    assert value_end("true,", 0) == 4
    assert value_end("12", 0) is None
    assert value_end('{"a": "}"', 0) is None


@pytest.mark.parametrize("text", ['{"a" 1}', '{a: 1}', '{"a": 1 "b": 2}', "[1]"])
def test_malformed_text_stops_the_scan_unfinished(text):
    obj = scan_object(text, 0)
    assert obj is None or obj.end is None


def test_arrays_of_objects_complete_and_partial():
    text = '[{"name": "a"}, {"name": "b", "parameters": {"x": 1}}]'
    objects, end = scan_array_of_objects(text, 0)
    assert end == len(text) and [o.value(text, "name") for o in objects] == ["a", "b"]
    objects, end = scan_array_of_objects(text[:20], 0)
    assert end is None and len(objects) == 2 and objects[1].end is None
    assert scan_array_of_objects("[]", 0) == ([], 2)
