"""Tool calling over HTTP with the official ``openai`` client, streamed and not.

* ``tool_choice: "required"`` (qwen2 checkpoint): the grammar forces calls, so every call names one of the
  tools and its arguments are valid under that tool's schema; ``finish_reason`` ``"tool_calls"``, content
  null; ``parallel_tool_calls: false`` gives exactly one call. A named function: one call of that function,
  arguments valid, ``finish_reason`` ``"stop"`` (as OpenAI's API answers a forced call). Cut by ``max_tokens``,
  a forced call is still the call, its arguments as written, streamed or not.
* Streaming: each call's first delta carries its id, type and name, later deltas fragments of its arguments;
  reassembled they equal the non-streamed response (greedy), with the same finish reason.
* ``tool_choice: "auto"`` with each ``--tool-call-parser`` on the family whose format it reads (hermes on
  ChatML, llama3_json on Llama 3, mistral on Mistral, pythonic on Gemma 3): the model's text is steered by a
  regex into that format (a random-weight model would not write it unprompted), and the server must find
  the content and the call in it, streamed or not; text that is not a call stays content. With ``strict``
  tools a grammar in that format holds the calls to their schemas (pythonic has none: 400).
* History: assistant ``tool_calls`` and ``tool`` messages are rendered by the chat template with the tools,
  token for token as transformers renders them.
"""

from __future__ import annotations

import json

import openai
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WHITESPACE = ("--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}')


@pytest.fixture(scope="module")
def qwen2(checkpoint_dir, shared_server) -> openai.OpenAI:
    server = shared_server(*WHITESPACE, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                           model=checkpoint_dir("qwen2"))
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def _create(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model="tiny", messages=kwargs.pop("messages", MESSAGES), temperature=0,
                                          max_tokens=kwargs.pop("max_tokens", 80), **kwargs)


def _streamed(client: openai.OpenAI, **kwargs) -> tuple[str, list[dict], str]:
    """(content, calls as {id, name, arguments}, finish_reason) reassembled from the stream's deltas."""
    content, calls, finish = "", {}, None
    for chunk in _create(client, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and not delta.function.name
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _check_calls(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        name = call.function.name if hasattr(call, "function") else call["name"]
        arguments = json.loads(call.function.arguments if hasattr(call, "function") else call["arguments"])
        jsonschema.validate(arguments, SCHEMAS[name])
        out.append((name, arguments))
    return out


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_are_valid_tools_with_valid_arguments(qwen2, parallel):
    response = _create(qwen2, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                       max_tokens=200)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    calls = _check_calls(choice.message.tool_calls)
    assert len(calls) >= 1 and (parallel or len(calls) == 1)
    assert all(call.id.startswith("chatcmpl-tool-") and call.type == "function" for call in choice.message.tool_calls)
    content, streamed, finish = _streamed(qwen2, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                                          max_tokens=200)
    assert (content, finish) == ("", "tool_calls")
    assert _check_calls(streamed) == calls


def test_a_named_function_is_called_with_valid_arguments(qwen2):
    choice = _create(qwen2, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}
                     ).choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    calls = _check_calls(choice.message.tool_calls)
    assert [name for name, _ in calls] == ["get_time"]
    content, streamed, finish = _streamed(qwen2, tools=TOOLS,
                                          tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (content, finish) == ("", "stop") and _check_calls(streamed) == calls


@pytest.mark.parametrize("tool_choice,max_tokens", [   # cut after the call's name, inside its arguments
    ("required", 20), ({"type": "function", "function": {"name": "get_weather"}}, 6)])
def test_a_forced_call_cut_by_max_tokens_is_the_call_streamed_or_not(qwen2, tool_choice, max_tokens):
    choice = _create(qwen2, tools=TOOLS, tool_choice=tool_choice, max_tokens=max_tokens).choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name in SCHEMAS
    with pytest.raises(ValueError):
        json.loads(call.function.arguments)   # as the model wrote them, cut short
    content, streamed, finish = _streamed(qwen2, tools=TOOLS, tool_choice=tool_choice, max_tokens=max_tokens)
    assert (content, finish) == ("", "length")
    assert [(c["name"], c["arguments"]) for c in streamed] == [(call.function.name, call.function.arguments)]


def test_tool_choice_none_answers_with_text(qwen2):
    choice = _create(qwen2, tools=TOOLS, tool_choice="none", max_tokens=5).choices[0]
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason == "length"


# family -> (parser, regex the model's output is steered into, content, calls)
AUTO_FORMATS = {
    "qwen2": ("hermes", r'Let me check\.<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", '
                        r'"days": 2\}\}\n</tool_call>', "Let me check.", [("get_weather", {"city": "Paris", "days": 2})]),
    "llama3": ("llama3_json", r'<\|python_tag\|>\{"name": "get_time", "parameters": \{"zone": "UTC"\}\}', None,
               [("get_time", {"zone": "UTC"})]),
    "mistral": ("mistral", r'\[TOOL_CALLS\]get_weather\[ARGS\]\{"city": "Rome", "days": 1\}\[TOOL_CALLS\]get_time'
                           r'\[ARGS\]\{"zone": "CET"\}', None,
                [("get_weather", {"city": "Rome", "days": 1}), ("get_time", {"zone": "CET"})]),
    "gemma3": ("pythonic", r'\[get_weather\(city="Paris", days=3\), get_time\(zone="UTC"\)\]', None,
               [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "UTC"})]),
}


@pytest.fixture(scope="module", params=sorted(AUTO_FORMATS))
def auto(request, checkpoint_dir, shared_server):
    parser = AUTO_FORMATS[request.param][0]
    if request.param == "qwen2":
        server_flags = (*WHITESPACE, "--enable-auto-tool-choice", "--tool-call-parser", parser)
    else:
        server_flags = ("--enable-auto-tool-choice", "--tool-call-parser", parser)
    server = shared_server(*server_flags, model=checkpoint_dir(request.param))
    return request.param, openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def test_auto_tool_calls_are_parsed_from_the_model_format(auto):
    family, client = auto
    _, regex, content, calls = AUTO_FORMATS[family]
    steer = {"structured_outputs": {"regex": regex}}
    choice = _create(client, tools=TOOLS, extra_body=steer, max_tokens=120).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content == content
    assert _check_calls(choice.message.tool_calls) == calls
    streamed_content, streamed, finish = _streamed(client, tools=TOOLS, extra_body=steer, max_tokens=120)
    assert (streamed_content or None, finish) == (content, "tool_calls")
    assert _check_calls(streamed) == calls


def test_auto_text_that_is_no_call_stays_content(auto):
    _, client = auto
    steer = {"structured_outputs": {"regex": r"It is (sunny|rainy) today\."}}
    choice = _create(client, tools=TOOLS, extra_body=steer).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content in ("It is sunny today.", "It is rainy today.")
    content, streamed, finish = _streamed(client, tools=TOOLS, extra_body=steer)
    assert (content, streamed, finish) == (choice.message.content, [], "stop")


STRICT_TOOLS = [{"type": "function", "function": {**tool["function"], "strict": True}} for tool in TOOLS]


def test_auto_with_strict_tools_answers_under_the_formats_grammar(auto):
    """Strict tools with ``auto``: a grammar in the parser's format (its acceptance is tested in
    tool_parsers/test_strict.py) constrains the output, so the answer is content or calls valid under their
    schemas, the same streamed; the request's own constraint cannot be added to it. The pythonic format has no
    such grammar: 400 naming it."""
    family, client = auto
    if AUTO_FORMATS[family][0] == "pythonic":
        with pytest.raises(openai.BadRequestError, match='not enforced with tool_choice "auto" in the pythonic format'):
            _create(client, tools=STRICT_TOOLS)
        return
    choice = _create(client, tools=STRICT_TOOLS).choices[0]
    calls = _check_calls(choice.message.tool_calls or [])
    assert calls or choice.message.content
    content, streamed, finish = _streamed(client, tools=STRICT_TOOLS)
    assert (content or None, _check_calls(streamed), finish) == (choice.message.content, calls, choice.finish_reason)
    with pytest.raises(openai.BadRequestError, match="combine with a JSON output constraint only, not with a regex"):
        _create(client, tools=STRICT_TOOLS, extra_body={"structured_outputs": {"regex": "It is sunny"}})
    json_object = {"type": "json_object"}
    if AUTO_FORMATS[family][0] in ("hermes", "mistral"):
        assert _create(client, tools=STRICT_TOOLS, response_format=json_object, max_tokens=4).choices
    elif AUTO_FORMATS[family][0] == "llama3_json":
        with pytest.raises(openai.BadRequestError, match="in the llama3_json format, whose calls are JSON answers"):
            _create(client, tools=STRICT_TOOLS, response_format=json_object)
    else:
        with pytest.raises(openai.BadRequestError, match='not enforced with tool_choice "auto" in the pythonic'):
            _create(client, tools=STRICT_TOOLS, response_format=json_object)


VERDICT = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no"]}}, "required": ["verdict"],
           "additionalProperties": False}


def test_auto_with_strict_tools_and_a_json_response_format_answers_in_it_or_calls(qwen2, checkpoint_dir):
    """OpenAI's pair (the Agents SDK sends it for a typed output): strict tools with ``auto`` and a JSON
    ``response_format``. The output is the answer, JSON under the format's schema (compact: the server's
    whitespace rule), or calls valid under their schemas; each branch is chosen here by biasing its first token
    (and EOS, wherever the grammar lets the output end; whitespace, which a random-weight model repeats where the
    format allows it, is banned), the grammar decides the rest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("qwen2"))
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}

    blank = {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}

    def bias(first: str) -> dict[str, int]:
        return {**blank, str(tokenizer.convert_tokens_to_ids(first)): 100, str(tokenizer.eos_token_id): 50}

    choice = _create(qwen2, tools=STRICT_TOOLS, response_format=fmt, logit_bias=bias("{")).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert json.loads(choice.message.content) in ({"verdict": "yes"}, {"verdict": "no"})
    assert " " not in choice.message.content
    choice = _create(qwen2, tools=STRICT_TOOLS, response_format=fmt, parallel_tool_calls=False,
                     logit_bias=bias("<")).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(_check_calls(choice.message.tool_calls)) == 1


def test_auto_with_tools_and_a_json_response_format_may_still_call_them(qwen2, checkpoint_dir):
    """Tools without ``strict`` and a JSON ``response_format``: the format no longer rules the calls out (it
    shapes the answer); a call names one of the tools and its arguments are some JSON object (the closing brace
    is biased here, so the object is ``{}``). On /v1/responses the same pair (``text.format``) is accepted."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("qwen2"))
    blank = {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}
    ids = {t: str(tokenizer.convert_tokens_to_ids(t)) for t in ("<", "}")}
    bias = {**blank, ids["<"]: 100, ids["}"]: 30, str(tokenizer.eos_token_id): 50}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}
    choice = _create(qwen2, tools=TOOLS, response_format=fmt, parallel_tool_calls=False, logit_bias=bias).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name in SCHEMAS and json.loads(call.function.arguments) == {}
    response = qwen2.responses.create(
        model="tiny", input="What is the weather in Paris?", max_output_tokens=4,
        tools=[{"type": "function", **STRICT_TOOLS[0]["function"]}],
        text={"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT, "strict": True}})
    assert response.status in ("completed", "incomplete") and response.output


def test_history_with_calls_and_results_renders_as_transformers_does(qwen2, checkpoint_dir):
    from transformers import AutoTokenizer

    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "Sunny, 21 C"},
    ]
    response = _create(qwen2, messages=history, tools=TOOLS, tool_choice="none", max_tokens=1)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("qwen2"))
    rendered = [dict(m, content=m["content"] or "") for m in history]
    rendered[1]["tool_calls"] = [dict(rendered[1]["tool_calls"][0], function={
        "name": "get_weather", "arguments": {"city": "Paris", "days": 1}})]
    text = tokenizer.apply_chat_template(rendered, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in text and '"arguments": {"city": "Paris"' in text
    assert response.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
