"""``--api-key``: every model endpoint wants ``Authorization: Bearer <key>``; the probes do not.

* ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/tokenize``, ``/detokenize`` and the
  dashboard's data (``/dashboard/stats``; the page itself: tests/entrypoints/openai/test_dashboard.py) answer
  401 with OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` (type
  ``invalid_request_error``, code ``invalid_api_key``) when the header is missing, holds another key (also
  one differing only in case, a prefix or an extension of the key), uses another scheme (``Basic``,
  ``Token``, the bare key) or is empty; a streamed request is refused the same way, as JSON and not as a
  stream. The error never repeats the key it was sent, nor the server's.
* An unauthenticated request is refused before anything about its body is looked at: a request with an
  invalid or malformed body and no key gets 401, not 400.
* With the right key each endpoint answers 200, whatever the case of the scheme name (RFC 7235 makes it
  case-insensitive); the official ``openai`` client works with ``api_key=<key>`` (models, completions,
  chat, streaming) and raises ``openai.AuthenticationError`` (401, code ``invalid_api_key``) with a wrong one.
* ``/health``, ``/metrics`` and ``/version`` answer 200 without a key (and with a wrong one).
"""

from __future__ import annotations

import httpx
import openai
import pytest

KEY = "sekret"

ENDPOINTS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 2}),
    ("POST", "/tokenize", {"model": "tiny", "prompt": "Hello"}),
    ("POST", "/detokenize", {"model": "tiny", "tokens": [1, 2, 3]}),
    ("GET", "/dashboard/stats", None),
]
ENDPOINT_IDS = [path for _, path, _ in ENDPOINTS]

BAD_HEADERS = {
    "missing": {},
    "wrong key": {"Authorization": "Bearer wrong-key"},
    "wrong case key": {"Authorization": f"Bearer {KEY.upper()}"},
    "key prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
    "key extended": {"Authorization": f"Bearer {KEY}x"},
    "basic scheme": {"Authorization": f"Basic {KEY}"},
    "token scheme": {"Authorization": f"Token {KEY}"},
    "bare key": {"Authorization": KEY},
    "scheme only": {"Authorization": "Bearer"},
    "empty header": {"Authorization": ""},
    "key in another header": {"X-Api-Key": KEY},
}


# The body limit is for test_api_server.py's test of it (every body here is far smaller): one shared server.
GUARDED_FLAGS = ("--api-key", KEY, "--max-request-body-bytes", "2000")


@pytest.fixture(scope="module")
def guarded(shared_server):
    return shared_server(*GUARDED_FLAGS)


def call(base_url: str, method: str, path: str, body: dict | None, headers: dict) -> httpx.Response:
    return httpx.request(method, base_url + path, json=body, headers=headers, timeout=30)


def assert_401(response: httpx.Response, sent: str | None = None) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert error["param"] is None and error["message"]
    assert KEY not in error["message"] and KEY.upper() not in error["message"]
    if sent:
        assert sent not in error["message"]


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=ENDPOINT_IDS)
def test_model_endpoints_refuse_without_the_right_key(guarded, method, path, body):
    for name, headers in BAD_HEADERS.items():
        response = call(guarded.base_url, method, path, body, headers)
        try:
            assert_401(response, sent=headers.get("Authorization", "").partition(" ")[2] or None)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=ENDPOINT_IDS)
def test_model_endpoints_answer_with_the_right_key(guarded, method, path, body):
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = call(guarded.base_url, method, path, body, {"Authorization": f"{scheme} {KEY}"})
        assert response.status_code == 200, (scheme, response.text)
        assert "error" not in response.json()


def test_streamed_request_is_refused_as_json(guarded):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", guarded.base_url + "/v1/completions", json=body) as response:
        response.read()
    assert_401(response)


def test_invalid_body_without_key_is_401(guarded):
    """A schema-invalid body is not validated for someone who is not allowed in."""
    for path, body in [("/v1/completions", {"prompt": 5, "max_tokens": "many"}),
                       ("/v1/chat/completions", {"messages": "hi"}),
                       ("/tokenize", {"prompt": ["not", "a", "string"]}),
                       ("/detokenize", {"tokens": "abc"})]:
        assert_401(httpx.post(guarded.base_url + path, json=body))


def test_malformed_json_without_key_is_401(guarded):
    response = httpx.post(guarded.base_url + "/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert_401(response)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version"])
def test_probes_are_open(guarded, path):
    assert httpx.get(guarded.base_url + path).status_code == 200
    assert httpx.get(guarded.base_url + path, headers={"Authorization": "Bearer wrong-key"}).status_code == 200


def test_openai_client_with_the_right_key(guarded):
    client = openai.OpenAI(base_url=f"{guarded.base_url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 3
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=3, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert streamed == completion.choices[0].text


@pytest.mark.parametrize("key", ["wrong-key", KEY.upper()])
def test_openai_client_with_a_wrong_key(guarded, key):
    client = openai.OpenAI(base_url=f"{guarded.base_url}/v1", api_key=key, max_retries=0)
    for call_api in (lambda: client.models.list(),
                     lambda: client.completions.create(model="tiny", prompt="Hello", max_tokens=2),
                     lambda: client.chat.completions.create(model="tiny", max_tokens=2,
                                                            messages=[{"role": "user", "content": "Hi"}]),
                     lambda: client.completions.create(model="tiny", prompt="Hello", max_tokens=2, stream=True)):
        with pytest.raises(openai.AuthenticationError) as info:
            call_api()
        assert info.value.status_code == 401
        assert info.value.code == "invalid_api_key"
        assert info.value.type == "invalid_request_error"
