"""``EngineMetrics.record_step``: the inter-token-latency histogram counts every generated token but each
sample's first, however the front end groups tokens into outputs (one per step, or two steps' at once
when it catches up)."""

from __future__ import annotations

from prometheus_client import generate_latest

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


def itl_count(metrics: EngineMetrics) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("vllm:inter_token_latency_seconds_count"):
            return float(line.split()[-1])
    raise AssertionError("no inter-token-latency histogram")


def test_every_token_but_each_sample_s_first_is_one_inter_token_latency():
    metrics = EngineMetrics("m")
    metrics.record_step(STATS, [output("merged", [5, 6]), output("single", [5]), output("n2", [5], [7])])
    assert itl_count(metrics) == 1          # the merged request's second token
    metrics.record_step(STATS, [output("merged", [8]), output("single", [6, 7]), output("n2", [6], [8])])
    assert itl_count(metrics) == 1 + 1 + 2 + 2
