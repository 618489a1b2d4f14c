"""Every refusal is OpenAI's error object, with the right status and the offending field named.

Checked over raw HTTP (httpx, raw sockets) against a server started with ``--max-n 4 --max-model-len 64
--max-request-body-bytes 2000 --max-header-bytes 4096`` unless said otherwise.

* Shape: every error body is exactly ``{"error": {"message", "type", "param", "code"}}`` served as
  ``application/json``; ``type`` is ``invalid_request_error`` for 4xx and ``server_error`` for 5xx. A
  message never leaks a server path (the model folder, ``/tmp``, ``site-packages``), a memory address
  (``0x...``) or a traceback.
* 400, never FastAPI's 422: a body that is not JSON, not a JSON object, empty, or valid JSON sent as
  ``text/plain`` (``param`` null); a field of the wrong JSON type (``"max_tokens": "ten"``,
  ``"temperature": "hot"``, ``messages`` not a list, a prompt of mixed shapes) or out of range
  (``temperature`` -1, ``top_p`` 0 or 1.5, ``n`` 0, ``n`` over ``--max-n``, ``best_of`` != ``n``,
  ``logprobs`` / ``top_logprobs`` 21 (the bound is 20), 17 stop strings (the bound is 16), ``logit_bias``
  with a non-numeric key, a non-numeric value, a value over 100, an id outside the vocabulary or more
  than 1024 entries, ...): ``param`` is the request field (``messages`` for ``messages[0].role``, whose
  full path the message gives). Prompts: ``""``, ``[]``, ``[[]]``, one empty prompt in a batch, a
  missing or null prompt / messages, a token id outside ``[0, vocab_size)``: 400 with ``param``
  ``prompt`` (``messages``); when one prompt of a batch is bad nothing of the batch runs (the prompt-token
  counter does not move). Integers beyond 64 bits (``seed``, ``top_k``) are 400 too.
* Tool calling that cannot be honoured: ``tool_choice`` ``auto`` (also the default when ``tools`` are
  given) on a server without ``--enable-auto-tool-choice``, any ``tool_choice`` but ``none`` without
  ``tools``, a named function that is not among them, a function defined twice, with parameters not of type
  ``"object"`` or with a name OpenAI does not allow, a parameters schema the grammar cannot enforce, a forced call
  together with ``response_format``: 400 naming ``tool_choice`` or ``tools``. A ``tool`` message without
  ``tool_call_id``, assistant ``tool_calls`` whose arguments are not JSON: 400 naming ``messages``.
* Not supported, so never accepted silently: OpenAI's deprecated ``functions`` / ``function_call`` other
  than their no-op values, ``suffix``, vLLM's ``stream_options.continuous_usage_stats`` and its extras
  ``allowed_token_ids``, ``bad_words``, ``return_tokens_as_token_ids``, ``prompt_logprobs``,
  ``use_beam_search``, ``logits_processors``, ``priority``, ``guided_decoding_backend`` (but llguidance's
  names), ``guided_whitespace_pattern``, ``length_penalty``, ``early_stopping``, ``return_token_ids``,
  ``prompt_embeds``, ``mm_processor_kwargs``, ``vllm_xargs`` and (chat) ``chat_template``, ``documents``,
  ``echo`` and OpenAI's ``store``, ``modalities``, ``audio``, ``reasoning_effort``, ``service_tier``,
  ``prediction``, ``web_search_options``: 400 naming the field; their no-op values are served. So are
  ``chat_template_kwargs`` that would set a parameter of the template renderer (``tokenize``).
  Unknown fields are served, ignored, and logged once per name.
* Context: prompt + ``max_tokens`` over ``--max-model-len`` is 400 ``"This model's maximum context length
  is 64 tokens. However, you requested N tokens (P in the prompt, M in the completion)..."`` with
  ``param`` ``max_tokens`` (also for the completions default of 16 tokens, and for chat); a prompt that
  alone fills the context is 400 with ``param`` ``prompt``; exactly 64 tokens in all is served.
* A request with ``"stream": true`` that is refused gets a JSON error, not an event stream.
* 404 ``model_not_found`` (``param`` ``model``) for an unknown model on every model endpoint; an unknown
  route is 404 and a known route with the wrong method 405 (with ``Allow``), both in OpenAI's shape.
* 413 for a body over ``--max-request-body-bytes``, whether announced by Content-Length or only counted
  in a chunked body, and the connection is closed; a body of exactly the limit is served.
* 431 for request headers over ``--max-header-bytes``, whether the head arrives at once or in pieces;
  headers under the limit are served.
* 503 with ``Retry-After`` and code ``overloaded`` when ``--max-num-queued-reqs`` requests are already
  waiting (``--max-num-queued-reqs 1 --max-num-seqs 1``, saturated by two long streams: one runs, one
  waits), for completions, chat and streaming requests alike; the two streams still complete normally,
  and afterwards requests are served again.
* After all of this the server is idle (nothing running, KV cache empty) and answers normally.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import HERE
from tests.entrypoints.openai.http_checks import check_error, scrape, wait_for_queue

SLOW = HERE / "slow_server.py"
MAX_MODEL_LEN = 64
MAX_BODY = 2000
MAX_HEADER = 4096
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def limited(start_server):
    return start_server("--max-n", "4", "--max-model-len", str(MAX_MODEL_LEN), "--max-request-body-bytes",
                        str(MAX_BODY), "--max-header-bytes", str(MAX_HEADER))


@pytest.fixture(scope="module")
def vocab_size(llama_dir) -> int:
    return json.loads((llama_dir / "config.json").read_text())["vocab_size"]


def post(base_url: str, path: str, body: dict | bytes, **kwargs) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(base_url + path, content=body, timeout=30,
                          headers={"content-type": "application/json", **kwargs.pop("headers", {})}, **kwargs)
    return httpx.post(base_url + path, json=body, timeout=30, **kwargs)


# ------------------------------------------------------------------ 400: bodies and fields

COMPLETION_CASES = [
    # (id, fields merged into {"model": "tiny", "prompt": "Hello", "max_tokens": 2}, param, message fragment)
    ("max_tokens-string", {"max_tokens": "ten"}, "max_tokens", "max_tokens"),
    ("max_tokens-fraction", {"max_tokens": 1.5}, "max_tokens", None),
    ("max_tokens-negative", {"max_tokens": -1}, "max_tokens", None),
    ("temperature-string", {"temperature": "hot"}, "temperature", "temperature"),
    ("temperature-negative", {"temperature": -1}, "temperature", None),
    ("top_p-zero", {"top_p": 0}, "top_p", None),
    ("top_p-above-one", {"top_p": 1.5}, "top_p", None),
    ("top_k-negative", {"top_k": -5}, "top_k", None),
    ("presence_penalty-range", {"presence_penalty": 3}, "presence_penalty", None),
    ("seed-string", {"seed": "abc"}, "seed", None),
    ("n-zero", {"n": 0}, "n", None),
    ("n-over-max-n", {"n": 5}, "n", "4"),
    ("best_of-not-n", {"n": 2, "best_of": 3}, "best_of", None),
    ("best_of-without-n", {"best_of": 2}, "best_of", None),
    ("logprobs-21", {"logprobs": 21}, "logprobs", "20"),
    ("logprobs-negative", {"logprobs": -1}, "logprobs", None),
    ("stop-17-strings", {"stop": ["x"] * 17}, "stop", "16"),
    ("stop-not-strings", {"stop": [1]}, "stop", "stop[0]"),
    ("stop-too-long", {"stop": "s" * 1025}, "stop", None),
    ("logit_bias-key-not-a-number", {"logit_bias": {"abc": 1}}, "logit_bias", None),
    ("logit_bias-value-not-a-number", {"logit_bias": {"5": "a"}}, "logit_bias", None),
    ("logit_bias-value-over-100", {"logit_bias": {"5": 101}}, "logit_bias", None),
    ("logit_bias-id-out-of-vocab", {"logit_bias": {"1000000": 1}}, "logit_bias", None),
    ("stop_token_ids-out-of-vocab", {"stop_token_ids": [1000000]}, "stop_token_ids", None),
    ("suffix", {"suffix": "tail"}, "suffix", "not supported"),
    ("seed-over-64-bits", {"seed": 2**64}, "seed", None),
    ("top_k-over-64-bits", {"top_k": 2**63}, "top_k", None),
    ("stream_options-continuous_usage_stats",
     {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "stream_options",
     "stream_options.continuous_usage_stats"),
    ("stream_options-without-stream", {"stream_options": {"include_usage": True}}, "stream_options",
     "only allowed with stream: true"),
    ("allowed_token_ids", {"allowed_token_ids": [5]}, "allowed_token_ids", "not supported"),
    ("bad_words", {"bad_words": ["x"]}, "bad_words", "not supported"),
    ("return_tokens_as_token_ids", {"return_tokens_as_token_ids": True}, "return_tokens_as_token_ids", None),
    ("prompt_logprobs", {"prompt_logprobs": 1}, "prompt_logprobs", "echo with logprobs"),
    ("use_beam_search", {"use_beam_search": True}, "use_beam_search", None),
    ("priority", {"priority": 1}, "priority", None),
    ("guided_decoding_backend", {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "llguidance"),
    ("guided_whitespace_pattern", {"guided_whitespace_pattern": " ?"}, "guided_whitespace_pattern", None),
    ("length_penalty", {"length_penalty": 0.5}, "length_penalty", "beam search"),
    ("early_stopping", {"early_stopping": True}, "early_stopping", "beam search"),
    ("return_token_ids", {"return_token_ids": True}, "return_token_ids", None),
    ("prompt_embeds", {"prompt_embeds": "AAAA"}, "prompt_embeds", None),
    ("mm_processor_kwargs", {"mm_processor_kwargs": {"x": 1}}, "mm_processor_kwargs", None),
    ("vllm_xargs", {"vllm_xargs": {"x": 1}}, "vllm_xargs", None),
    ("prompt-empty-string", {"prompt": ""}, "prompt", None),
    ("prompt-empty-list", {"prompt": []}, "prompt", None),
    ("prompt-empty-token-list", {"prompt": [[]]}, "prompt", None),
    ("prompt-one-empty-in-batch", {"prompt": ["Hello", ""]}, "prompt", None),
    ("prompt-null", {"prompt": None}, "prompt", None),
    ("prompt-object", {"prompt": {"text": "Hello"}}, "prompt", None),
    ("prompt-mixed-shapes", {"prompt": ["Hello", [1, 2]]}, "prompt", None),
    ("prompt-token-not-int", {"prompt": [[5, "six"]]}, "prompt", "prompt[0][1]"),
    ("prompt-token-negative", {"prompt": [5, -1]}, "prompt", "prompt[1]"),
    ("prompt-token-huge", {"prompt": [5, 10 ** 9]}, "prompt", None),
]

F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}   # a function tool
CHAT_CASES = [
    ("messages-not-a-list", {"messages": "hi"}, "messages", None),
    ("messages-empty", {"messages": []}, "messages", None),
    ("messages-null", {"messages": None}, "messages", None),
    ("messages-role-unknown", {"messages": [{"role": "wizard", "content": "x"}]}, "messages", "messages[0].role"),
    ("messages-role-missing", {"messages": [CHAT[0], {"content": "x"}]}, "messages", "messages[1].role"),
    ("messages-content-part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages[0].content[0].type"),
    ("messages-content-number", {"messages": [{"role": "user", "content": 5}]}, "messages", None),
    ("top_logprobs-21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("top_logprobs-without-logprobs", {"top_logprobs": 2}, "top_logprobs", None),
    ("n-over-max-n", {"n": 5}, "n", None),
    ("max_tokens-string", {"max_tokens": "ten"}, "max_tokens", None),
    ("max_completion_tokens-zero", {"max_completion_tokens": 0}, "max_completion_tokens", None),
    ("temperature-string", {"temperature": "hot"}, "temperature", None),
    ("logit_bias-key", {"logit_bias": {"x": 1}}, "logit_bias", None),
    ("messages-tool-without-call-id", {"messages": [CHAT[0], {"role": "tool", "content": "4"}]}, "messages",
     "tool_call_id"),
    ("messages-tool_calls-arguments-not-json", {"messages": [CHAT[0], {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]}, "messages",
     "must be JSON"),
    ("messages-function-role", {"messages": [CHAT[0], {"role": "function", "name": "f", "content": "4"}]},
     "messages", "use tool messages"),
    ("tools-auto-without-server-flags", {"tools": [F]}, "tool_choice", "--enable-auto-tool-choice"),
    ("tool_choice-auto-without-tools", {"tool_choice": "auto"}, "tool_choice", "needs tools"),
    ("tool_choice-required-without-tools", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("tool_choice-named-unknown", {"tools": [F], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice", "'g'"),
    ("tools-name-pattern", {"tools": [{"type": "function", "function": {"name": "get weather"}}],
                            "tool_choice": "required"}, "tools", None),
    ("tools-duplicate-name", {"tools": [F, F], "tool_choice": "required"}, "tools", "more than once"),
    ("tools-schema-not-enforceable", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "nonsense"}}}}}], "tool_choice": "required"}, "tools",
     "cannot be enforced"),
    ("tools-parameters-not-an-object", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}], "tool_choice": "required"}, "tools", 'type "object", got type "string"'),
    ("tool_choice-required-with-response_format", {"tools": [F], "tool_choice": "required",
                                                   "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ("chat_template", {"chat_template": "{{ messages }}"}, "chat_template", "--chat-template"),
    ("echo", {"echo": True}, "echo", "not supported"),
    ("documents", {"documents": [{"text": "x"}]}, "documents", None),
    ("continue_final_message-with-generation-prompt", {"continue_final_message": True}, "continue_final_message",
     "add_generation_prompt"),
    ("functions", {"functions": [{"name": "f"}]}, "functions", "deprecated"),
    ("function_call", {"function_call": "auto"}, "function_call", "deprecated"),
    ("chat_template_kwargs-renderer-parameter", {"chat_template_kwargs": {"tokenize": True}},
     "chat_template_kwargs", "tokenize"),
    ("store", {"store": True}, "store", "not stored"),
    ("modalities-audio", {"modalities": ["text", "audio"]}, "modalities", "only text"),
    ("audio", {"audio": {"voice": "alloy", "format": "mp3"}}, "audio", None),
    ("reasoning_effort", {"reasoning_effort": "high"}, "reasoning_effort", None),
    ("service_tier-flex", {"service_tier": "flex"}, "service_tier", None),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}, "prediction", None),
    ("web_search_options", {"web_search_options": {}}, "web_search_options", None),
    ("length_penalty-on-chat", {"length_penalty": 2.0}, "length_penalty", None),
]


@pytest.mark.parametrize("fields,param,fragment", [c[1:] for c in COMPLETION_CASES],
                         ids=[c[0] for c in COMPLETION_CASES])
def test_bad_completion_field_is_400_naming_it(limited, llama_dir, fields, param, fragment):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, **fields}
    error = check_error(post(limited.base_url, "/v1/completions", body), 400, param, secrets=(str(llama_dir),))
    if fragment is not None:
        assert fragment in error["message"]


@pytest.mark.parametrize("fields,param,fragment", [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_field_is_400_naming_it(limited, fields, param, fragment):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 2, **fields}
    error = check_error(post(limited.base_url, "/v1/chat/completions", body), 400, param)
    if fragment is not None:
        assert fragment in error["message"]


@pytest.mark.parametrize("path,fields", [
    ("/v1/completions", {"response_format": {"type": "text"}, "suffix": "", "guided_decoding_backend": "auto",
                         "length_penalty": 1.0, "early_stopping": False, "return_token_ids": False}),
    ("/v1/chat/completions", {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                              "functions": [], "function_call": "none", "store": False, "modalities": ["text"],
                              "service_tier": "auto", "metadata": {"team": "a"}, "audio": None,
                              "reasoning_effort": None, "prediction": None, "web_search_options": None,
                              "guided_decoding_backend": "guidance"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi", "name": "ann"},
                                           {"role": "assistant", "content": "Hello", "tool_calls": []},
                                           {"role": "user", "content": "Bye"}]}),
], ids=["completions", "chat", "chat-history"])
def test_no_op_values_of_unsupported_fields_are_accepted(limited, path, fields):
    prompt = {"prompt": "Hello"} if path == "/v1/completions" else {"messages": CHAT}
    body = {"model": "tiny", "max_tokens": 2, **prompt, **fields}
    response = post(limited.base_url, path, body)
    assert response.status_code == 200, response.text


def test_unknown_fields_are_ignored_and_logged_once(limited):
    for _ in range(2):
        response = post(limited.base_url, "/v1/completions", {"prompt": "Hello", "max_tokens": 1, "frobnicate": 1,
                                                              "speculative_hint": "x"})
        assert response.status_code == 200, response.text
    log = limited.log()
    for name in ("frobnicate", "speculative_hint"):
        assert log.count(f"request field '{name}' is not a field llmserve knows") == 1


def test_missing_prompt_or_messages_names_it(limited):
    error = check_error(post(limited.base_url, "/v1/completions", {"model": "tiny"}), 400, "prompt")
    assert "required" in error["message"]
    error = check_error(post(limited.base_url, "/v1/chat/completions", {"model": "tiny"}), 400, "messages")
    assert "required" in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "tiny", "prompt": "x",}', b"", b"[1, 2]", b'"Hello"',
                                 b"null", b"42", b'{"prompt": "\xff\xfe"}'],
                         ids=["garbage", "trailing-comma", "empty", "array", "string", "null", "number", "bad-utf8"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_body_that_is_not_a_json_object_is_400_not_422(limited, raw, path):
    check_error(post(limited.base_url, path, raw), 400, None)


def test_json_sent_as_text_plain_is_400_saying_so(limited):
    response = httpx.post(f"{limited.base_url}/v1/completions", content=b'{"prompt": "Hello"}',
                          headers={"content-type": "text/plain"})
    assert "JSON object" in check_error(response, 400, None)["message"]


def test_bad_prompt_in_a_batch_runs_nothing(limited, vocab_size):
    before = scrape(limited.base_url)
    check_error(post(limited.base_url, "/v1/completions", {"prompt": [[5, 6], [5, vocab_size]], "max_tokens": 2}),
                400, "prompt")
    check_error(post(limited.base_url, "/v1/completions", {"prompt": ["Hello", "", "World"], "max_tokens": 2}),
                400, "prompt")
    after = scrape(limited.base_url)
    assert after["vllm:prompt_tokens_total"] == before["vllm:prompt_tokens_total"]
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"]
    # The boundary: the largest id is a valid prompt.
    ok = post(limited.base_url, "/v1/completions", {"prompt": [[5, vocab_size - 1]], "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_logit_bias_with_too_many_entries(server):
    """Over 1024 entries: a body too big for the limited server, so the default one answers."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "logit_bias": {str(i): 1 for i in range(1025)}}
    assert "1024" in check_error(post(server.base_url, "/v1/completions", body), 400, "logit_bias")["message"]


def test_refused_streaming_request_gets_json_not_a_stream(limited):
    for path, body in [("/v1/completions", {"prompt": "Hello", "temperature": -1}),
                       ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}),
                       ("/v1/completions", {"prompt": "Hello", "model": "other"})]:
        with httpx.stream("POST", limited.base_url + path, json={"stream": True, **body}) as response:
            response.read()
        assert not response.headers["content-type"].startswith("text/event-stream")
        check_error(response, 404 if "model" in body else 400)


# ------------------------------------------------------------------ context length


def test_prompt_plus_max_tokens_over_the_context(limited):
    url = limited.base_url
    error = check_error(post(url, "/v1/completions", {"prompt": [5] * 40, "max_tokens": 30}), 400, "max_tokens")
    assert error["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens. "
                                       "However, you requested 70 tokens (40 in the prompt, 30 in the completion)")
    # The completions default of 16 tokens counts too.
    error = check_error(post(url, "/v1/completions", {"prompt": [5] * 60}), 400, "max_tokens")
    assert "you requested 76 tokens" in error["message"]
    # A prompt that fills the context on its own names the prompt.
    for prompt in ([5] * MAX_MODEL_LEN, "hello " * 80):
        error = check_error(post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 1}), 400, "prompt")
        assert error["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens")
    # Chat: the rendered conversation is the prompt.
    prompt_len = httpx.post(f"{url}/tokenize", json={"messages": CHAT}).json()["count"]
    error = check_error(post(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_MODEL_LEN}), 400,
                        "max_tokens")
    assert f"you requested {prompt_len + MAX_MODEL_LEN} tokens ({prompt_len} in the prompt" in error["message"]
    # Exactly the context is served.
    ok = post(url, "/v1/completions", {"prompt": [5] * 48, "max_tokens": 16, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 16
    ok = post(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_MODEL_LEN - prompt_len,
                                           "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == MAX_MODEL_LEN


# ------------------------------------------------------------------ 404 / 405


def test_unknown_model_is_404_model_not_found(limited):
    for path, body in [("/v1/completions", {"prompt": "Hello"}), ("/v1/chat/completions", {"messages": CHAT}),
                       ("/tokenize", {"prompt": "Hello"}), ("/detokenize", {"tokens": [5]})]:
        error = check_error(post(limited.base_url, path, {"model": "gpt-4o", **body}), 404, "model",
                            "model_not_found")
        assert "gpt-4o" in error["message"]


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/nothing", 404), ("POST", "/v1/nothing", 404), ("GET", "/", 404), ("POST", "/v2/completions", 404),
    ("GET", "/v1/completions", 405), ("PUT", "/v1/chat/completions", 405), ("DELETE", "/health", 405),
    ("POST", "/v1/models", 405),
])
def test_unknown_route_or_method_in_openai_shape(limited, method, path, status):
    response = httpx.request(method, limited.base_url + path)
    check_error(response, status, None)
    if status == 405:
        assert response.headers.get("allow")


# ------------------------------------------------------------------ size limits


def padded_body(size: int) -> bytes:
    """A valid completions request of exactly ``size`` bytes."""
    base = b'{"model": "tiny", "prompt": "Hello", "max_tokens": 1}'
    return base[:-1] + b" " * (size - len(base)) + b"}"


def test_body_over_the_limit_is_413_by_content_length_and_by_counting(limited):
    url = f"{limited.base_url}/v1/completions"
    assert post(limited.base_url, "/v1/completions", padded_body(MAX_BODY)).status_code == 200
    response = post(limited.base_url, "/v1/completions", padded_body(MAX_BODY + 1))
    check_error(response, 413, None)
    assert response.headers.get("connection") == "close"

    def chunked(body: bytes):
        for i in range(0, len(body), 300):
            yield body[i:i + 300]

    for size, status in [(MAX_BODY, 200), (MAX_BODY + 1, 413), (50 * MAX_BODY, 413)]:
        response = httpx.post(url, content=chunked(padded_body(size)), headers={"content-type": "application/json"})
        assert response.request.headers.get("transfer-encoding") == "chunked"
        if status == 413:
            check_error(response, 413, None)
        else:
            assert response.status_code == 200, response.text
    # Streaming requests too, and chat.
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * MAX_BODY}],
                       "stream": True}).encode()
    check_error(post(limited.base_url, "/v1/chat/completions", body), 413, None)


def raw_request(port: int, head: bytes, pieces: int = 1) -> bytes:
    """Send ``head`` over a fresh socket in ``pieces`` writes; return what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        step = -(-len(head) // pieces)
        try:
            for i in range(0, len(head), step):
                if select.select([sock], [], [], 0)[0]:
                    break   # answered already: stop writing, so the server's close cannot reset the answer
                sock.sendall(head[i:i + step])
                time.sleep(0.05)
        except OSError:
            pass   # the server answered and closed before the whole head was sent
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data


def _content_length(data: bytes) -> int:
    match = re.search(rb"content-length: (\d+)", data, re.IGNORECASE)
    return int(match.group(1)) if match else 0


def test_headers_over_the_limit_are_refused_431(limited):
    ok = httpx.get(f"{limited.base_url}/health", headers={"x-padding": "a" * (MAX_HEADER - 1000)})
    assert ok.status_code == 200
    check_error(httpx.get(f"{limited.base_url}/health", headers={"x-padding": "a" * MAX_HEADER}), 431, None)
    check_error(httpx.post(f"{limited.base_url}/v1/completions", json={"prompt": "Hello"},
                           headers={"x-padding": "a" * MAX_HEADER}), 431, None)
    for size, pieces in [(2 * MAX_HEADER, 4), (100_000, 20)]:
        head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * size + b"\r\n\r\n"
        answer = raw_request(limited.port, head, pieces)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 431"), answer[:200]
        body = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{limited.base_url}/health").status_code == 200


# ------------------------------------------------------------------ 503: the queue is full


def test_full_queue_is_503_with_retry_after_then_recovers(start_server):
    srv = start_server("--max-num-queued-reqs", "1", "--max-num-seqs", "1", "--step-delay", "0.005",
                       wrapper=SLOW)
    url = srv.base_url
    long_body = {"model": "tiny", "prompt": "go", "max_tokens": 500, "ignore_eos": True, "stream": True}

    async def run() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def stream() -> list[str]:
                async with client.stream("POST", "/v1/completions", json=long_body) as response:
                    assert response.status_code == 200
                    return [line async for line in response.aiter_lines() if line]

            # One at a time: a request not yet scheduled counts as waiting, so two sent together could
            # find the queue full already.
            streams = [asyncio.ensure_future(stream())]
            await wait_for_queue(url, 1, 0)
            streams.append(asyncio.ensure_future(stream()))
            await wait_for_queue(url, 1, 1)
            for path, body in [("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
                               ("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "stream": True})]:
                refused = await client.post(path, json=body)
                check_error(refused, 503, None, "overloaded")
                assert int(refused.headers["retry-after"]) >= 1
            assert not any(s.done() for s in streams)   # they were running all along
            return await asyncio.gather(*streams)

    for events in asyncio.run(run()):
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    ok = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    m = scrape(url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0


def test_server_is_idle_and_healthy_after_all_errors(limited):
    deadline = time.monotonic() + 5
    while True:
        m = scrape(limited.base_url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["vllm:num_requests_waiting"] == 0
    assert httpx.get(f"{limited.base_url}/health").status_code == 200
    ok = post(limited.base_url, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
