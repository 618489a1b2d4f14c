"""``POST /v1/responses`` with the official ``openai`` client (qwen2 checkpoint, hermes tool parser).

* Text: ``instructions`` are the system message and a string ``input`` the user's (the input token count
  is the chat template's rendering of the two); ``max_output_tokens`` cutting the output gives status
  ``incomplete`` with reason ``max_output_tokens``; ``text.format`` json_schema gives output valid under
  the schema and status ``completed``. Streamed: ``response.created``, ``response.in_progress``, the
  message's ``output_item.added``, ``content_part.added``, ``output_text.delta``s, their ``.done`` events,
  ``output_item.done``, then ``response.completed`` / ``response.incomplete``, numbered 0, 1, 2, ...; the
  deltas join into the final text, which equals the non-streamed one (greedy).
* Function tools: ``tool_choice`` required / named gives ``function_call`` items whose arguments are valid
  under the tool's schema; streamed as ``output_item.added`` (name, call id), ``function_call_arguments``
  deltas, ``.done``; equal to non-streamed.
* Earlier ``function_call`` and ``function_call_output`` items are rendered as the chat template renders an
  assistant's tool calls and the tool's answers.
* Refusals (400 naming the field): ``store: true``, ``previous_response_id``, ``background``, ``reasoning``,
  ``include``, ``truncation: "auto"``, an image input part, an empty input, a forced tool choice without
  tools, ``auto`` on a server without a tool parser (``tool_choice``), output beyond the context
  (``max_output_tokens``). Unknown model: 404.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.entrypoints.openai.test_tool_calling import WHITESPACE   # the same flags: the same shared server

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

TIME = {"type": "function", "name": "get_time", "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"],
                       "additionalProperties": False}}
WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta"]


@pytest.fixture(scope="module")
def qwen2_server(checkpoint_dir, shared_server):
    return shared_server(*WHITESPACE, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                         model=checkpoint_dir("qwen2"))


@pytest.fixture(scope="module")
def client(qwen2_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{qwen2_server.base_url}/v1", api_key="x", max_retries=0)


def _create(client: openai.OpenAI, **kwargs):
    return client.responses.create(model="tiny", temperature=0, **kwargs)


def test_text_response_and_its_stream(client, checkpoint_dir):
    from transformers import AutoTokenizer

    response = _create(client, input="Tell me a story.", instructions="Be brief.", max_output_tokens=12)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output_text
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("qwen2"))
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Tell me a story."}],
                                             tokenize=False, add_generation_prompt=True)
    assert response.usage.input_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert response.usage.output_tokens == 12

    events = list(_create(client, input="Tell me a story.", instructions="Be brief.", max_output_tokens=12,
                          stream=True))
    kinds = [event.type for event in events]
    assert kinds[:5] == TEXT_EVENTS
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == events[-4].text == response.output_text == events[-1].response.output_text


def test_text_format_json_schema_completes_with_valid_json(client):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}
    response = _create(client, input="A city as JSON.", max_output_tokens=40,
                       text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    assert response.status == "completed" and response.incomplete_details is None
    jsonschema.validate(json.loads(response.output_text), schema)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}],
                         ids=["required", "named"])
def test_function_calls_and_their_stream(client, tool_choice):
    kwargs = dict(input="Weather in Paris?", tools=[TIME, WEATHER], tool_choice=tool_choice, max_output_tokens=80,
                  parallel_tool_calls=False)
    response = _create(client, **kwargs)
    assert response.status == "completed"
    [call] = response.output
    assert call.type == "function_call" and call.call_id and call.status == "completed"
    schema = {"get_time": TIME, "get_weather": WEATHER}[call.name]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)
    if isinstance(tool_choice, dict):
        assert call.name == "get_weather"

    events = list(_create(client, stream=True, **kwargs))
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2].item.type == "function_call" and events[2].item.name == call.name
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == events[-3].arguments == call.arguments
    [streamed] = events[-1].response.output
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)


def test_function_call_items_in_the_input_render_as_tool_turns(client, checkpoint_dir):
    from transformers import AutoTokenizer

    response = _create(client, tools=[TIME], tool_choice="none", max_output_tokens=1, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Time in Paris?"}]},
        {"type": "function_call", "call_id": "call-1", "name": "get_time", "arguments": '{"zone": "CET"}'},
        {"type": "function_call_output", "call_id": "call-1", "output": "12:00"}])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("qwen2"))
    chat_tool = {"type": "function", "function": {k: v for k, v in TIME.items() if k != "type"}}
    rendered = tokenizer.apply_chat_template([
        {"role": "user", "content": "Time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call-1", "type": "function", "function": {
            "name": "get_time", "arguments": {"zone": "CET"}}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "12:00"}], tools=[chat_tool], tokenize=False,
        add_generation_prompt=True)
    assert "<tool_response>\n12:00\n</tool_response>" in rendered
    assert response.usage.input_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


@pytest.mark.parametrize("fields,param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp-1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": ""}, "input"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools"),
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"text": {"verbosity": "low"}}, "text"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else v)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(qwen2_server, fields, param):
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, **fields}
    response = httpx.post(f"{qwen2_server.base_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("fmt,message", [
    ({"type": "json_schema", "name": "x", "schema": {"type": "array", "uniqueItems": True}},
     "text.format.schema: the JSON schema cannot be compiled"),
    ({"type": "json_schema", "schema": {"type": "object"}}, "text.format: name is required with json_schema"),
    ({"type": "json_schema", "name": "x"}, "text.format: schema is required with json_schema"),
])
def test_a_bad_text_format_is_named_as_the_responses_field(qwen2_server, fmt, message):
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "text": {"format": fmt}}
    response = httpx.post(f"{qwen2_server.base_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "text" and error["message"].startswith(message), error
    assert "response_format" not in error["message"], error


def test_a_forced_call_with_a_text_format_is_refused_naming_the_responses_field(qwen2_server):
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 2, "tools": [TIME], "tool_choice": "required",
            "text": {"format": {"type": "json_object"}}}
    response = httpx.post(f"{qwen2_server.base_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "cannot be combined with text.format" in message and "response_format" not in message, message


def test_auto_tool_choice_needs_a_server_tool_parser(server):
    body = {"model": "tiny", "input": "Hi", "tools": [TIME], "max_output_tokens": 2}
    response = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in response.json()["error"]["message"]
    response = httpx.post(f"{server.base_url}/v1/responses", json={**body, "model": "other"}, timeout=30)
    assert response.status_code == 404
