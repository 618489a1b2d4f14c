"""GET /metrics: Prometheus text with vLLM's metric names, so vLLM dashboards work unchanged, and values
that account for every request exactly.

* From the moment the server is ready (before any request) it exposes, labelled ``model_name="tiny"``:
  gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``,
  ``vllm:gpu_cache_usage_perc`` (all 0); counters ``vllm:num_preemptions_total``,
  ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total`` (0) and
  ``vllm:request_success_total`` with a ``finished_reason`` label for every finish reason
  (``stop``, ``length``, ``abort``: 0); histograms ``vllm:time_to_first_token_seconds``,
  ``vllm:time_per_output_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``,
  ``vllm:iteration_tokens_total`` (count 0).
* While requests run, the gauges show them: with ``--max-num-seqs 2`` and four long streamed requests,
  2 running and 2 waiting, KV-cache usage above 0 (``gpu_cache_usage_perc`` always equals
  ``kv_cache_usage_perc``).
* Once they finish, running, waiting and KV usage are back to 0, and the counters moved by exactly what
  the responses' ``usage`` says: prompt tokens by the sum of ``usage.prompt_tokens``, generation tokens
  by the sum of ``usage.completion_tokens``; ``request_success`` by one per engine request (each prompt
  of a multi-prompt completion is one), under its ``finished_reason``; TTFT, end-to-end and queue-time
  histograms by one observation per request, time-per-output-token by one per request with more than
  one token, inter-token latency by one per token after a request's first.
* When the KV cache is too small for the batch, sequences are preempted and recomputed:
  ``vllm:num_preemptions_total`` rises, outputs still equal the offline API's, and generation tokens
  still count each token once.
"""

from __future__ import annotations

import asyncio
import string
import time
from collections import defaultdict

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmserve import LLM, SamplingParams

GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "vllm:gpu_cache_usage_perc"]
COUNTERS = ["vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success"]
HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
              "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
              "vllm:request_queue_time_seconds", "vllm:iteration_tokens_total"]
FINISH_REASONS = ["stop", "length", "abort"]


class Scrape:
    """One parsed GET /metrics."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name].append((sample.labels, sample.value))

    def __getitem__(self, name: str) -> float:
        """A sample's value summed over its labels (histogram buckets excluded)."""
        assert name in self.samples, f"{name} missing from /metrics"
        return sum(value for labels, value in self.samples[name] if "le" not in labels)

    def success(self, reason: str) -> float:
        return sum(value for labels, value in self.samples["vllm:request_success_total"]
                   if labels.get("finished_reason") == reason)

    @property
    def idle(self) -> bool:
        return all(self[name] == 0 for name in GAUGES)


def scrape(base_url: str) -> Scrape:
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def wait_for(base_url: str, condition, timeout: float = 10.0) -> Scrape:
    """Scrape until ``condition(scrape)`` holds (metrics are recorded by the engine thread after it hands a
    step's outputs to the clients, so a response can arrive a moment before its counters move)."""
    deadline = time.monotonic() + timeout
    while True:
        current = scrape(base_url)
        if condition(current) or time.monotonic() > deadline:
            return current
        time.sleep(0.02)


@pytest.fixture(scope="module")
def metrics_server(start_server):
    """A server of its own (no other test's requests in its counts), scraped once as soon as it is ready."""
    srv = start_server("--max-num-seqs", "2")
    return srv, scrape(srv.base_url)


@pytest.fixture(scope="module")
def offline(llama_dir) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes="16MiB")


def test_every_metric_exists_from_the_start(metrics_server):
    _, fresh = metrics_server
    for name in GAUGES:
        assert fresh.types.get(name) == "gauge", name
        assert fresh.samples[name] == [({"model_name": "tiny"}, 0.0)], name
    for name in COUNTERS:
        assert fresh.types.get(name) == "counter", name
        assert fresh[f"{name}_total"] == 0, name
        assert all(labels["model_name"] == "tiny" for labels, _ in fresh.samples[f"{name}_total"])
    reasons = {labels["finished_reason"] for labels, _ in fresh.samples["vllm:request_success_total"]}
    assert reasons >= set(FINISH_REASONS)
    for name in HISTOGRAMS:
        assert fresh.types.get(name) == "histogram", name
        assert fresh[f"{name}_count"] == 0 and fresh[f"{name}_sum"] == 0, name
        buckets = [labels["le"] for labels, _ in fresh.samples[f"{name}_bucket"]]
        assert buckets[-1] == "+Inf" and len(buckets) > 5, name


def pick_stop(text: str) -> str:
    for start in range(3, len(text) - 3):
        if all(ch in string.ascii_letters for ch in text[start:start + 3]):
            return text[start:start + 3]
    raise AssertionError(f"no usable stop string in {text!r}")


def test_gauges_while_running_and_exact_counts_after(metrics_server, offline):
    srv, _ = metrics_server
    url = srv.base_url
    before = wait_for(url, lambda s: s.idle)
    assert before.idle
    long_tokens = 250
    stop_text = offline.generate(["Hello world, this is"], SamplingParams(temperature=0, max_tokens=24,
                                                                          ignore_eos=True))[0].outputs[0].text
    stop = pick_stop(stop_text)

    async def run() -> tuple[list, Scrape]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        first_chunk = [asyncio.Event() for _ in range(4)]

        async def long_stream(i: int):
            stream = await client.completions.create(model="tiny", prompt=f"Long request number {i}",
                                                     max_tokens=long_tokens, temperature=0, stream=True,
                                                     stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            usage = None
            async for chunk in stream:
                first_chunk[i].set()
                if chunk.usage is not None:
                    usage = chunk.usage
            assert usage is not None and usage.completion_tokens == long_tokens
            return [(usage.prompt_tokens, usage.completion_tokens, "length")]

        streams = [asyncio.ensure_future(long_stream(i)) for i in range(4)]
        during = None
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(500):   # until two run and two wait behind them (--max-num-seqs 2)
                current = Scrape((await http.get("/metrics")).text)
                if current["vllm:num_requests_running"] == 2 and current["vllm:num_requests_waiting"] == 2:
                    during = current
                    break
                await asyncio.sleep(0.01)
        assert during is not None, "never saw 2 running and 2 waiting"
        assert sum(e.is_set() for e in first_chunk) <= 2, "at most two requests can have started"
        results = await asyncio.gather(*streams)

        # Then a mix of non-streamed requests ending in different ways.
        chat = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        results.append([(chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.choices[0].finish_reason)])
        stopped = await client.completions.create(model="tiny", prompt="Hello world, this is", max_tokens=24,
                                                  temperature=0, stop=stop, extra_body={"ignore_eos": True})
        assert stopped.choices[0].finish_reason == "stop"
        results.append([(stopped.usage.prompt_tokens, stopped.usage.completion_tokens, "stop")])
        single = await client.completions.create(model="tiny", prompt="One token", max_tokens=1, temperature=0,
                                                 extra_body={"ignore_eos": True})
        results.append([(single.usage.prompt_tokens, 1, single.choices[0].finish_reason)])
        pair = await client.completions.create(model="tiny", prompt=["First of two", "Second of two"],
                                               max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
        per_prompt = [len(offline.get_tokenizer().encode(p)) for p in ("First of two", "Second of two")]
        assert pair.usage.prompt_tokens == sum(per_prompt)
        results.append([(per_prompt[0], 3, "length"), (per_prompt[1], 3, "length")])
        await client.close()
        return [item for group in results for item in group], during

    requests, during = asyncio.run(run())
    assert during["vllm:kv_cache_usage_perc"] > 0
    assert during["vllm:gpu_cache_usage_perc"] == during["vllm:kv_cache_usage_perc"]

    count = len(requests)
    assert count == 9
    after = wait_for(url, lambda s: s.idle and s["vllm:request_success_total"] - before["vllm:request_success_total"]
                     >= count)
    assert after.idle, "running / waiting / KV usage did not return to 0"

    def delta(name: str) -> float:
        return after[name] - before[name]

    assert delta("vllm:prompt_tokens_total") == sum(p for p, _, _ in requests)
    assert delta("vllm:generation_tokens_total") == sum(c for _, c, _ in requests)
    assert delta("vllm:request_success_total") == count
    for reason in FINISH_REASONS:
        expected = sum(1 for _, _, r in requests if r == reason)
        assert after.success(reason) - before.success(reason) == expected, reason
    assert delta("vllm:num_preemptions_total") == 0
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds"):
        assert delta(f"{name}_count") == count, name
    assert delta("vllm:time_per_output_token_seconds_count") == sum(1 for _, c, _ in requests if c > 1)
    assert delta("vllm:inter_token_latency_seconds_count") == sum(c - 1 for _, c, _ in requests)
    assert delta("vllm:e2e_request_latency_seconds_sum") >= delta("vllm:time_to_first_token_seconds_sum") > 0
    # Two long requests waited for the other two to finish all their tokens.
    assert delta("vllm:request_queue_time_seconds_sum") > 0
    assert delta("vllm:inter_token_latency_seconds_sum") > 0
    # Every prompt token not served by the prefix cache was computed in some step, and the steps were batched.
    computed_prompt = delta("vllm:prompt_tokens_total") - delta("vllm:prefix_cache_hits_total")
    assert delta("vllm:iteration_tokens_total_sum") >= computed_prompt + sum(c - 1 for _, c, _ in requests)
    assert 0 < delta("vllm:iteration_tokens_total_count") < sum(c for _, c, _ in requests)


def test_preemptions_are_counted(start_server, llama_dir):
    """24 blocks of 16 tokens cannot hold four 120-token sequences at once: some are preempted."""
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4   # K and V x 2 layers x 16 tokens x 2 KV heads x head_dim 16 x fp32
    srv = start_server("--kv-cache-memory-bytes", str(24 * block_bytes), "--max-model-len", "256")
    before = scrape(srv.base_url)
    prompts = [f"Preempt me, request {i}" for i in range(4)]
    max_tokens = 110
    offline = LLM(str(llama_dir), kv_cache_memory_bytes="16MiB")
    expected = [o.outputs[0].text for o in offline.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(client.completions.create(
                model="tiny", prompt=p, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
                for p in prompts))

    responses = asyncio.run(run())
    assert [r.choices[0].text for r in responses] == expected
    after = wait_for(srv.base_url, lambda s: s.idle and s["vllm:request_success_total"] >= 4)
    assert after.idle
    assert after["vllm:num_preemptions_total"] - before["vllm:num_preemptions_total"] > 0
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 4 * max_tokens
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == sum(
        r.usage.prompt_tokens for r in responses)
    assert after.success("length") - before.success("length") == 4


def test_cache_salt_isolates_prefix_cache_hits(metrics_server):
    """The same long prompt again hits the prefix cache, but not under another ``cache_salt``; the same
    salt again hits. An empty salt is refused."""
    srv, _ = metrics_server
    prompt = " ".join(f"word{i}" for i in range(60))

    def hits_after(**extra) -> float:
        before = scrape(srv.base_url)["vllm:prefix_cache_hits_total"]
        response = httpx.post(f"{srv.base_url}/v1/completions", timeout=60,
                              json={"prompt": prompt, "max_tokens": 1, **extra})
        assert response.status_code == 200, response.text
        return wait_for(srv.base_url, lambda s: s.idle)["vllm:prefix_cache_hits_total"] - before

    hits_after()                                        # fills the cache
    assert hits_after() > 0                             # unsalted again: hit
    assert hits_after(cache_salt="tenant-a") == 0       # another salt: no hit
    assert hits_after(cache_salt="tenant-a") > 0        # the same salt: hit
    assert hits_after(cache_salt="tenant-b") == 0
    response = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": prompt, "cache_salt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"

    def responses_hits_after(salt: str) -> float:   # /v1/responses takes it too (vLLM's extra field)
        before = scrape(srv.base_url)["vllm:prefix_cache_hits_total"]
        response = httpx.post(f"{srv.base_url}/v1/responses", timeout=60,
                              json={"input": prompt, "max_output_tokens": 1, "cache_salt": salt})
        assert response.status_code == 200, response.text
        return wait_for(srv.base_url, lambda s: s.idle)["vllm:prefix_cache_hits_total"] - before

    responses_hits_after("tenant-c")
    assert responses_hits_after("tenant-c") > 0
    assert responses_hits_after("tenant-d") == 0
