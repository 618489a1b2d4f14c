"""The OpenAI-compatible server end to end, over real HTTP against a subprocess: the official `openai`
client works unchanged, streamed and non-streamed greedy outputs equal the offline API's, every error
path answers OpenAI's error object with the right status, and disconnects give the KV blocks back."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmserve import LLM, SamplingParams
from tests.entrypoints.openai.test_auth import GUARDED_FLAGS

SLOW = Path(__file__).parent / "slow_server.py"

PROMPTS = ["Hello world, this is", "The quick brown fox", "def add(a, b):", "Une phrase en français"]


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(str(llama_dir), kv_cache_memory_bytes="16MiB")


def offline_texts(offline: LLM, prompts, max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in offline.generate(prompts, params)]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over labels}."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def metrics(base_url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{base_url}/metrics").text)


def wait_idle(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url)
        if (m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param
    assert "0x" not in body["error"]["message"] and "/work" not in body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------ the openai client


def test_openai_client_completions_and_chat_equal_offline(server, offline):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    expected = offline_texts(offline, PROMPTS[:2], 8)
    out = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert out.usage.completion_tokens == 16
    messages = [{"role": "user", "content": "Hi there"}]
    prompt_ids = offline.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = offline.get_tokenizer().encode(prompt_ids, add_special_tokens=False)
    chat_expected = offline.generate([ids], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == chat_expected.outputs[0].text
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len(ids)


def test_streaming_n_and_logprobs(server, offline):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    texts: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, n=3,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    expected = offline_texts(offline, PROMPTS[:1], 8)[0]
    assert texts == {0: expected, 1: expected, 2: expected}
    assert usage is not None and usage.completion_tokens == 24
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, logprobs=True, top_logprobs=3, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)


def test_raw_chat_stream_is_framed_like_openai(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body) as response:
        raw = "".join(response.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_64_concurrent_streams_equal_offline(server, offline):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(64)]
    expected = offline_texts(offline, prompts, 12)

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

        async def one(prompt: str) -> str:
            text = ""
            stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
            return text

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == expected
    wait_idle(server.base_url)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"model": "tiny", "prompt": [[5, 10 ** 9]]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"model": "tiny"}, "prompt"),
])
def test_bad_completion_requests_get_400_naming_the_field(server, body, param):
    error = assert_openai_error(httpx.post(f"{server.base_url}/v1/completions", json=body), 400, param)
    if body.get("max_tokens") == 100000:
        assert error["message"].startswith("This model's maximum context length is 2048 tokens")


def test_malformed_json_unknown_model_and_route(server):
    response = httpx.post(f"{server.base_url}/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400)
    error = assert_openai_error(httpx.post(f"{server.base_url}/v1/completions",
                                           json={"model": "nope", "prompt": "x"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert_openai_error(httpx.post(f"{server.base_url}/v1/chat/completions",
                                   json={"model": "tiny", "messages": "hi"}), 400, "messages")
    assert_openai_error(httpx.get(f"{server.base_url}/v1/nothing"), 404)


def test_auth_and_body_limit(shared_server):   # the full queue (503) is in test_errors.py
    guarded = shared_server(*GUARDED_FLAGS)   # --api-key sekret --max-request-body-bytes 2000
    url = guarded.base_url
    for path, body in [("/v1/completions", {"prompt": "x"}), ("/tokenize", {"prompt": "x"})]:
        assert_openai_error(httpx.post(url + path, json=body), 401)
        assert_openai_error(httpx.post(url + path, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_openai_error(httpx.get(url + "/v1/models"), 401)
    for open_path in ("/health", "/metrics", "/version"):
        assert httpx.get(url + open_path).status_code == 200
    auth = {"Authorization": "Bearer sekret"}
    assert httpx.post(url + "/tokenize", json={"prompt": "hello"}, headers=auth).json()["count"] > 0
    assert_openai_error(httpx.post(url + "/v1/completions", json={"prompt": "x" * 5000}, headers=auth), 413)

    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth).status_code == 200


# ------------------------------------------------------------------ lifecycle


def test_disconnects_abort_and_free_blocks(server):
    body = {"model": "tiny", "prompt": "go", "max_tokens": 1900, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}) as response:
        for _ in response.iter_lines():
            break   # read one event, then hang up
    m = wait_idle(server.base_url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=0.2)
    m = wait_idle(server.base_url)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0


def test_metrics_move_and_return_to_idle(server):
    before = wait_idle(server.base_url)   # the server is shared: counters are compared with their values now

    async def run() -> dict[str, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tiny", "prompt": "go", "max_tokens": 300, "ignore_eos": True}
            tasks = [asyncio.ensure_future(client.post(f"{server.base_url}/v1/completions", json=body))
                     for _ in range(3)]
            for _ in range(100):
                during = parse_metrics((await client.get(f"{server.base_url}/metrics")).text)
                if during["vllm:num_requests_running"] > 0:
                    break
                await asyncio.sleep(0.02)
            responses = await asyncio.gather(*tasks)
            assert all(r.status_code == 200 for r in responses)
            return during

    during = asyncio.run(run())
    assert during["vllm:num_requests_running"] > 0 and during["vllm:kv_cache_usage_perc"] > 0
    after = wait_idle(server.base_url)
    for name, count in (("vllm:generation_tokens_total", 900), ("vllm:request_success_total", 3),
                        ("vllm:e2e_request_latency_seconds_count", 3)):
        assert after[name] - before.get(name, 0) == count, name
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "vllm:gpu_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "llmserve:kv_cache_waste_perc"):
        assert name in after


def test_request_timeout_sigterm_and_request_id(start_server):
    # A 2 ms sleep per step: 1900 tokens take >= 3.8 s however fast the machine decodes the tiny model.
    srv = start_server("--request-timeout", "1", "--shutdown-timeout", "20", "--step-delay", "0.002", wrapper=SLOW)
    body = {"model": "tiny", "prompt": "go", "max_tokens": 1900, "ignore_eos": True}
    assert_openai_error(httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=30), 504)
    with httpx.stream("POST", f"{srv.base_url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
    assert wait_idle(srv.base_url)["vllm:kv_cache_usage_perc"] == 0
    response = httpx.post(f"{srv.base_url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                          headers={"X-Request-Id": "trace-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    assert srv.stop() == 0   # SIGTERM: graceful, exit 0
    assert "request trace-42 finished: prompt_tokens=" in srv.log()
