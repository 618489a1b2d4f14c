"""vLLM's request extras that change what a request does, honoured (the ones refused are in test_errors.py):

* ``add_special_tokens``: completions and embeddings tokenise a text prompt with the tokenizer's special tokens
  (BOS) by default, without them when false; chat adds them on top of the rendered template when true (the
  template writes its own, so the default is false). ``usage.prompt_tokens`` counts the difference.
* ``request_id`` names the response (``cmpl-<id>``, ``chatcmpl-<id>``); two requests with the same one both run.
* ``/tokenize`` with messages renders ``tools`` and ``chat_template_kwargs`` as chat does, so its count is
  what a chat request with them sends (and a renderer parameter among the kwargs is refused as on chat); with a
  prompt they are refused.
* ``/v1/embeddings`` takes ``cache_salt`` and refuses ``priority`` other than 0.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.entrypoints.openai.http_checks import check_error

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}},
                                       "required": ["zone"]}}}]


def _post(server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def special_count(llama_dir) -> int:
    """How many special tokens the tiny llama's tokenizer adds to a text (its BOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    count = len(tokenizer.encode("Hello", add_special_tokens=True)) - len(tokenizer.encode("Hello",
                                                                                             add_special_tokens=False))
    assert count > 0
    return count


def test_add_special_tokens_on_completions_chat_and_embeddings(server, special_count):
    def tokens(path: str, body: dict) -> int:
        return _post(server, path, {"model": "tiny", **body})["usage"]["prompt_tokens"]

    completion = {"prompt": "Hello there", "max_tokens": 1}
    assert tokens("/v1/completions", completion) - tokens("/v1/completions", {**completion,
                                                                              "add_special_tokens": False}) \
        == special_count
    assert tokens("/v1/completions", {**completion, "prompt": [1, 2, 3], "add_special_tokens": False}) == 3
    chat = {"messages": CHAT, "max_tokens": 1}
    assert tokens("/v1/chat/completions", {**chat, "add_special_tokens": True}) - tokens("/v1/chat/completions", chat) \
        == special_count
    embedding = {"input": "Hello there"}
    assert tokens("/v1/embeddings", embedding) - tokens("/v1/embeddings", {**embedding, "add_special_tokens": False}) \
        == special_count


def test_request_id_names_the_response_and_may_repeat(server):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "request_id": "client-7"}
    with ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(lambda _: _post(server, "/v1/completions", body)["id"], range(2)))
    assert ids == ["cmpl-client-7", "cmpl-client-7"]
    chat = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 1,
                                                  "request_id": "c8"})
    assert chat["id"] == "chatcmpl-c8"


@pytest.fixture(scope="module")
def qwen2_server(checkpoint_dir, shared_server):
    return shared_server(model=checkpoint_dir("qwen2"))


def test_tokenize_renders_tools_and_template_variables_as_chat_does(qwen2_server):
    plain = _post(qwen2_server, "/tokenize", {"messages": CHAT})["count"]
    with_tools = _post(qwen2_server, "/tokenize", {"messages": CHAT, "tools": TOOLS})["count"]
    assert with_tools > plain   # the template writes the tools into the system turn
    chat = _post(qwen2_server, "/v1/chat/completions", {"messages": CHAT, "tools": TOOLS, "tool_choice": "none",
                                                        "max_tokens": 1})
    assert chat["usage"]["prompt_tokens"] == with_tools
    renderer_parameter = {"messages": CHAT, "chat_template_kwargs": {"tokenize": True}}   # refused as on chat
    check_error(httpx.post(f"{qwen2_server.base_url}/tokenize", json=renderer_parameter, timeout=60), 400,
                "chat_template_kwargs")
    for field, value in (("tools", TOOLS), ("chat_template_kwargs", {"x": 1})):
        check_error(httpx.post(f"{qwen2_server.base_url}/tokenize", json={"prompt": "Hi", field: value},
                               timeout=60), 400, field)


def test_embeddings_take_cache_salt_and_refuse_priority(server):
    body = {"model": "tiny", "input": "Hello there"}
    assert _post(server, "/v1/embeddings", {**body, "cache_salt": "tenant-a"})["data"]
    check_error(httpx.post(f"{server.base_url}/v1/embeddings", json={**body, "priority": 1}, timeout=60), 400,
                "priority")
