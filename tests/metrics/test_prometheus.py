"""``EngineMetrics``: the inter-token-latency histogram counts every generated token but each
sample's first, however the front end groups tokens into outputs (one per step, or two steps' at once
when it catches up); tokens reported together share the time since the sample's previous report evenly. A
finished request feeds vLLM's per-request histograms once, and request_success_total once per sample."""

from __future__ import annotations

from prometheus_client import generate_latest

from llmserve.metrics import prometheus
from llmserve.metrics.prometheus import EngineMetrics
from llmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

STATS = {"iteration_tokens": [], "aborts": [], "num_requests_running": 0, "num_requests_waiting": 0,
         "kv_cache_usage": 0.0, "num_preemptions": 0, "prompt_tokens": 0, "generation_tokens": 0,
         "prefix_cache_queries": 0, "prefix_cache_hits": 0, "kv_cache_waste": 0.0}


def output(request_id: str, *tokens_per_sample: list[int]) -> RequestOutput:
    completions = [CompletionOutput(index=i, text="", token_ids=t, cumulative_logprob=None, logprobs=None,
                                    finish_reason=None) for i, t in enumerate(tokens_per_sample)]
    return RequestOutput(request_id, None, [1, 2], None, completions, False,
                         RequestMetrics(arrival_time=0.0, first_token_time=1.0), 0)


def itl_value(metrics: EngineMetrics, suffix: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(f"vllm:inter_token_latency_seconds_{suffix}"):
            return float(line.split()[-1])
    raise AssertionError("no inter-token-latency histogram")


def itl_count(metrics: EngineMetrics) -> float:
    return itl_value(metrics, "count")


def test_every_token_but_each_sample_s_first_is_one_inter_token_latency():
    metrics = EngineMetrics("m")
    metrics.record_step(STATS, [output("merged", [5, 6]), output("single", [5]), output("n2", [5], [7])])
    assert itl_count(metrics) == 1          # the merged request's second token
    metrics.record_step(STATS, [output("merged", [8]), output("single", [6, 7]), output("n2", [6], [8])])
    assert itl_count(metrics) == 1 + 1 + 2 + 2


def test_tokens_reported_together_share_the_time_since_the_previous_report(monkeypatch):
    metrics = EngineMetrics("m")
    clock = iter([1.0, 5.0])
    monkeypatch.setattr(prometheus.time, "monotonic", lambda: next(clock))
    metrics.record_step(STATS, [output("r", [5])])           # the first token, sampled at 1.0
    metrics.record_step(STATS, [output("r", [6, 7, 8, 9])])  # four more, reported together 4 s later
    assert itl_count(metrics) == 4 and itl_value(metrics, "sum") == 4.0


def sample(metrics: EngineMetrics, name: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"no {name}")


def test_a_finished_request_feeds_vllms_per_request_histograms():
    """vLLM's prefill / decode / inference times and prompt / generation token histograms, once per request;
    request_success_total counts each of its samples, as vLLM counts each sample a request of its own."""
    metrics = EngineMetrics("m")
    finished = RequestOutput("r", None, [1, 2, 3], None, [
        CompletionOutput(0, "", [5, 6, 7, 8], None, None, finish_reason="length"),
        CompletionOutput(1, "", [5], None, None, finish_reason="stop")], True,
        RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0, finished_time=13.0),
        num_generated_tokens=4)
    metrics.record_step(STATS, [finished])
    for name, value in (("vllm:request_prefill_time_seconds", 0.5), ("vllm:request_decode_time_seconds", 2.0),
                        ("vllm:request_inference_time_seconds", 2.5), ("vllm:request_prompt_tokens", 3),
                        ("vllm:request_generation_tokens", 4)):
        assert sample(metrics, f"{name}_count") == 1 and sample(metrics, f"{name}_sum") == value, name
    success = {reason: value for line in generate_latest(metrics.registry).decode().splitlines()
               if line.startswith("vllm:request_success_total{")
               for reason, value in [(line.split('finished_reason="')[1].split('"')[0], float(line.split()[-1]))]}
    assert (success["length"], success["stop"]) == (1, 1)


def success_counts(metrics: EngineMetrics) -> dict[str, float]:
    return {line.split('finished_reason="')[1].split('"')[0]: float(line.split()[-1])
            for line in generate_latest(metrics.registry).decode().splitlines()
            if line.startswith("vllm:request_success_total{")}


def test_a_sample_that_finished_before_the_others_is_counted_once():
    """Streamed (delta) outputs report a sample's finish once, in the output where it ends; the request's final
    output then holds only the samples still going."""
    metrics = EngineMetrics("m")
    early = RequestOutput("r", None, [1, 2], None, [
        CompletionOutput(0, "", [5], None, None), CompletionOutput(1, "", [6], None, None, finish_reason="stop")],
        False, RequestMetrics(arrival_time=0.0, first_token_time=1.0))
    last = RequestOutput("r", None, [1, 2], None, [CompletionOutput(0, "", [7], None, None, finish_reason="length")],
                         True, RequestMetrics(arrival_time=0.0, first_token_time=1.0, finished_time=2.0),
                         num_generated_tokens=2)
    metrics.record_step(STATS, [early])
    metrics.record_step(STATS, [last])
    assert {reason: n for reason, n in success_counts(metrics).items() if n} == {"stop": 1, "length": 1}
