"""``EngineMetrics.record_step``: the inter-token-latency histogram counts every generated token but each
sample's first, however the front end groups tokens into outputs (one per step, or two steps' at once
when it catches up); tokens reported together share the time since the sample's previous report evenly."""

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
