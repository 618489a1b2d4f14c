"""``POST /v1/embeddings`` as OpenAI's API defines it, through the official ``openai`` client and raw HTTP,
against the shared default server (``--pooler-config`` default: last token, L2-normalised).

* ``client.embeddings.create`` with a string, a list of strings, token ids or a list of token-id lists:
  one ``data`` entry per input (``object: "embedding"``, ``index`` in input order), each vector the final
  hidden state of the input's last token (after the final norm), L2-normalised, as HF transformers
  computes it on the same checkpoint (within 1e-4); ``usage`` counts the input tokens (``prompt_tokens ==
  total_tokens``); ``object: "list"``, ``model`` the served name. ``user`` is accepted; vLLM's
  ``normalize: false`` gives the vectors as pooled.
* ``encoding_format``: ``float`` gives the floats; ``base64`` gives the float32 little-endian bytes in base64
  (the client's default: it asks for base64 and decodes it itself), the same vector.
* Refused with OpenAI's error object: an empty string, an empty list, an empty string in a list, a token id
  outside the vocabulary and an input longer than the context are 400 with ``param: "input"``;
  ``dimensions`` is 400 naming ``dimensions``; an unknown model is 404. Nothing of a refused batch runs.
* ``X-Request-Id`` is echoed; the prompt-token counter of /metrics counts the inputs' tokens.
* With ``--max-num-queued-reqs 1 --max-num-seqs 1`` an embedding request finding the queue full is 503
  ``overloaded``; one running past ``--request-timeout`` is 504 ``timeout`` and is aborted, and so is one
  whose client disconnects (logged under its ``X-Request-Id``); the server is idle afterwards, and serves
  the next request.
"""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.entrypoints.openai.http_checks import check_error, scrape, wait_for_queue
from tests.entrypoints.openai.test_errors import SLOW
from tests.hf_reference import hf_pooled

INPUTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog", "A"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_dir))


def assert_hf_vectors(llama_dir, vectors, token_ids, normalize: bool = True) -> None:
    assert len(vectors) == len(token_ids)
    for vector, ids in zip(vectors, token_ids):
        torch.testing.assert_close(torch.tensor(vector, dtype=torch.float32),
                                   hf_pooled(llama_dir, ids, "LAST", normalize), atol=1e-4, rtol=0)


def test_every_input_shape_gives_hf_vectors_in_order(client, llama_dir, tokenizer):
    ids = [tokenizer.encode(text) for text in INPUTS]
    for given, expected_ids in [(INPUTS[0], ids[:1]), (INPUTS, ids), (ids[1], ids[1:2]), (ids, ids)]:
        response = client.embeddings.create(model="tiny", input=given, encoding_format="float", user="someone")
        assert response.object == "list" and response.model == "tiny"
        assert [d.index for d in response.data] == list(range(len(expected_ids)))
        assert all(d.object == "embedding" for d in response.data)
        assert_hf_vectors(llama_dir, [d.embedding for d in response.data], expected_ids)
        tokens = sum(len(i) for i in expected_ids)
        assert (response.usage.prompt_tokens, response.usage.total_tokens) == (tokens, tokens)
    raw = client.embeddings.create(model="tiny", input=INPUTS, encoding_format="float", extra_body={"normalize": False})
    assert_hf_vectors(llama_dir, [d.embedding for d in raw.data], ids, normalize=False)


def test_base64_is_the_float32_little_endian_bytes_of_the_same_vector(client):
    floats = [d.embedding for d in client.embeddings.create(model="tiny", input=INPUTS, encoding_format="float").data]
    encoded = client.embeddings.create(model="tiny", input=INPUTS, encoding_format="base64").data
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in encoded]
    default = [d.embedding for d in client.embeddings.create(model="tiny", input=INPUTS).data]   # decoded by the client
    for vectors in (decoded, default):
        # Another request, computed in another batch (the repeat served from the prefix cache): float32 rounding.
        torch.testing.assert_close(torch.tensor(np.array(vectors, dtype=np.float32)), torch.tensor(floats), atol=1e-5,
                                   rtol=0)


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["fine", ""]}, "input"),
    ({"input": [[1, 2], []]}, "input"), ({"input": [1, 2000]}, "input"), ({"input": [5] * 2049}, "input"),
    ({"input": "fine", "dimensions": 8}, "dimensions"), ({"input": "fine", "encoding_format": "int8"},
                                                         "encoding_format"),
    ({"input": "fine", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
])
def test_bad_requests_are_400_naming_the_field_and_run_nothing(server, body, param):
    before = scrape(server.base_url)["vllm:prompt_tokens_total"]
    error = check_error(httpx.post(f"{server.base_url}/v1/embeddings", json={"model": "tiny", **body}), 400, param)
    if param == "dimensions":
        assert "Matryoshka" in error["message"]
    assert scrape(server.base_url)["vllm:prompt_tokens_total"] == before


def test_the_context_limit_message_and_an_unknown_model(server):
    error = check_error(httpx.post(f"{server.base_url}/v1/embeddings", json={"input": [5] * 2049}), 400, "input")
    assert error["message"].startswith("This model's maximum context length is 2048 tokens. However, the input "
                                       "has 2049 tokens")
    check_error(httpx.post(f"{server.base_url}/v1/embeddings", json={"model": "nope", "input": "x"}), 404, "model",
                "model_not_found")


def test_request_id_is_echoed_and_prompt_tokens_are_counted(server, tokenizer):
    before = scrape(server.base_url)["vllm:prompt_tokens_total"]
    response = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": INPUTS},
                          headers={"X-Request-Id": "embed-7"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "embed-7"
    assert response.json()["id"].startswith("embd-")
    expected = sum(len(tokenizer.encode(text)) for text in INPUTS)
    assert scrape(server.base_url)["vllm:prompt_tokens_total"] - before == expected


def test_full_queue_is_503_a_slow_request_times_out_and_a_disconnect_aborts(start_server):
    srv = start_server("--max-num-queued-reqs", "1", "--max-num-seqs", "1", "--max-num-batched-tokens", "8",
                       "--request-timeout", "2", "--step-delay", "0.05", wrapper=SLOW)
    url = srv.base_url
    long_input = {"input": [5] * 400}   # 50 steps of 8 tokens, >= 2.5 s

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            slow = [asyncio.ensure_future(client.post("/v1/embeddings", json=long_input))]
            await wait_for_queue(url, 1, 0)
            slow.append(asyncio.ensure_future(client.post("/v1/embeddings", json=long_input)))
            await wait_for_queue(url, 1, 1)
            refused = await client.post("/v1/embeddings", json={"input": "Hello"})
            check_error(refused, 503, None, "overloaded")
            assert int(refused.headers["retry-after"]) >= 1
            return await asyncio.gather(*slow)

    for response in asyncio.run(run()):
        check_error(response, 504, None, "timeout")
    asyncio.run(wait_for_queue(url, 0, 0))   # the timed-out requests are aborted between engine steps
    with pytest.raises(httpx.ReadTimeout):   # the client gives up and closes the connection
        # another input: the timed-out requests left their computed blocks in the prefix cache
        httpx.post(f"{url}/v1/embeddings", json={"input": [6] * 400}, headers={"X-Request-Id": "gone-1"},
                   timeout=0.5)
    for _ in range(100):
        if "request gone-1 aborted: the client disconnected" in srv.log():
            break
        time.sleep(0.02)
    else:
        pytest.fail("the disconnected request was not aborted")
    ok = httpx.post(f"{url}/v1/embeddings", json={"input": "Hello"}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    m = scrape(url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0


def test_truncate_prompt_tokens_embeds_the_inputs_last_tokens(client, server):
    """vLLM's ``truncate_prompt_tokens``: an input over the context length is cut to its last k tokens (-1: the
    context length) instead of refused; the vector is the cut input's."""
    long = [5] * 2040 + [7, 8, 9, 10, 11, 12, 13, 14, 15]   # 2049 tokens: one over the context
    cut = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": long, "truncate_prompt_tokens": -1}).json()
    assert cut["usage"]["prompt_tokens"] == 2048
    last = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": long, "truncate_prompt_tokens": 4}).json()
    alone = client.embeddings.create(model="tiny", input=[long[-4:]], encoding_format="float")
    assert last["usage"]["prompt_tokens"] == 4
    assert last["data"][0]["embedding"] == pytest.approx(alone.data[0].embedding, abs=1e-5)
