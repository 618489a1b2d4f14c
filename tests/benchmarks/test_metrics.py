"""Serving metrics: known timings in, known percentiles / TPOT / goodput out (vLLM's definitions)."""

from __future__ import annotations

import pytest

from llmserve.benchmarks.metrics import (RequestResult, compute_metrics, format_report, parse_goodput,
                                         parse_metric_list, parse_percentiles, percentile_stats)
from llmserve.benchmarks.sweep import capacity, meets, parse_rates, parse_slos


def results() -> list[RequestResult]:
    return [
        # TTFT 100 ms, 11 tokens over 1.1 s -> TPOT (1.1 - 0.1) / 10 = 100 ms
        RequestResult(True, prompt_len=10, output_tokens=11, ttft=0.1, latency=1.1, itl=[0.1] * 10, start=0.0),
        # TTFT 300 ms, 6 tokens over 0.8 s -> TPOT 100 ms
        RequestResult(True, prompt_len=20, output_tokens=6, ttft=0.3, latency=0.8, itl=[0.1] * 5, start=0.5),
        # one token: no TPOT (counts as 0 towards goodput)
        RequestResult(True, prompt_len=30, output_tokens=1, ttft=0.2, latency=0.2, itl=[], start=1.0),
        RequestResult(False, prompt_len=40, error="boom"),
    ]


def test_totals_and_throughput():
    m = compute_metrics(results(), duration=2.0, percentiles=[50, 99])
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 18
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(9.0)
    assert m["total_token_throughput"] == pytest.approx(39.0)
    assert m["request_goodput"] is None
    assert m["errors"] == ["", "", "", "boom"]


def test_percentiles_in_ms():
    m = compute_metrics(results(), duration=2.0, percentiles=[50, 99])
    # TTFTs 100, 300, 200 ms
    assert m["mean_ttft_ms"] == pytest.approx(200)
    assert m["median_ttft_ms"] == pytest.approx(200)
    assert m["p50_ttft_ms"] == pytest.approx(200)
    assert m["p99_ttft_ms"] == pytest.approx(298)          # linear interpolation: 200 + 0.98 * 100
    assert m["std_ttft_ms"] == pytest.approx((20000 / 3) ** 0.5)
    # TPOT only from requests with > 1 token: both 100 ms
    assert m["mean_tpot_ms"] == pytest.approx(100) and m["p99_tpot_ms"] == pytest.approx(100)
    assert m["mean_itl_ms"] == pytest.approx(100) and len(m["itls"][0]) == 10
    assert m["median_e2el_ms"] == pytest.approx(800)
    assert m["p99_e2el_ms"] == pytest.approx(800 + 0.98 * 300)


def test_selected_metrics_only():
    m = compute_metrics(results(), 2.0, [90], selected=["ttft", "e2el"])
    assert "p90_ttft_ms" in m and "p90_e2el_ms" in m
    assert not any(k.endswith("_tpot_ms") or k.endswith("_itl_ms") for k in m)
    assert percentile_stats("x", [], [99.9]) == {"mean_x_ms": 0.0, "median_x_ms": 0.0, "std_x_ms": 0.0,
                                                 "p99.9_x_ms": 0.0}


def test_goodput():
    rs = results()
    # ttft <= 250 ms: requests 1 (100) and 3 (200) -> 2 good over 2 s
    assert compute_metrics(rs, 2.0, [99], goodput={"ttft": 250})["request_goodput"] == pytest.approx(1.0)
    # tpot <= 50 ms: only the one-token request (TPOT 0) qualifies
    assert compute_metrics(rs, 2.0, [99], goodput={"tpot": 50})["request_goodput"] == pytest.approx(0.5)
    # all SLOs at once: ttft <= 250 and e2el <= 1000 -> only request 3
    both = compute_metrics(rs, 2.0, [99], goodput={"ttft": 250, "e2el": 1000})
    assert both["request_goodput"] == pytest.approx(0.5)
    assert compute_metrics(rs, 2.0, [99], goodput={"ttft": 10_000, "tpot": 10_000})["request_goodput"] == 1.5


def test_peak_concurrency_and_token_rate():
    m = compute_metrics(results(), 2.0, [99])
    assert m["max_concurrent_requests"] == 3   # 1 (0-1.1 s), 2 (0.5-1.3 s) and 3 (1.0-1.2 s) overlap at 1.05 s
    rs = [RequestResult(True, 1, 4, ttft=0.25, latency=1.75, itl=[0.5, 0.5, 0.5], start=0.0),   # 0.25 .75 1.25 1.75
          RequestResult(True, 1, 2, ttft=0.125, latency=0.375, itl=[0.25], start=1.0)]          # 1.125 1.375
    m = compute_metrics(rs, 2.0, [99])
    assert m["max_output_tokens_per_s"] == 4 and m["max_concurrent_requests"] == 2


def test_parsers():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(["ttft:500 e2el:3000"]) == {"ttft": 500.0, "e2el": 3000.0}
    for bad in (["itl:5"], ["ttft=5"], ["ttft:x"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert parse_percentiles("50,99.9") == [50.0, 99.9]
    with pytest.raises(ValueError):
        parse_percentiles("0")
    assert parse_metric_list("ttft,e2el") == ["ttft", "e2el"]
    with pytest.raises(ValueError):
        parse_metric_list("ttft,latency")
    assert parse_slos(["ttft_p99:2000", "tpot_median:50", "e2el_p99.0:9"]) == {
        "p99_ttft_ms": 2000.0, "median_tpot_ms": 50.0, "p99_e2el_ms": 9.0}
    with pytest.raises(ValueError):
        parse_slos(["ttft:2000"])
    assert parse_rates("4,1,2") == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError):
        parse_rates("1,inf")


def test_capacity_is_the_last_rate_before_the_first_miss():
    def point(rate, ok):
        return {"request_rate": rate, "meets_slo": ok}

    assert capacity([point(1, True), point(2, True), point(4, False), point(8, True)]) == 2
    assert capacity([point(1, False), point(2, True)]) is None
    slos = {"p99_ttft_ms": 250.0}
    m = compute_metrics(results()[:3], 2.0, [99])
    assert not meets(m, slos) and meets(m, {"p99_ttft_ms": 300.0})
    assert not meets(compute_metrics(results(), 2.0, [99]), {"p99_ttft_ms": 300.0})   # a failed request


def test_report_layout():
    m = compute_metrics(results(), 2.0, [50, 99], goodput={"ttft": 250})
    text = format_report(m, [50, 99], ["ttft", "tpot", "itl", "e2el"])
    for line in ("Successful requests:", "Request goodput (req/s):", "P99 TTFT (ms):", "Mean TPOT (ms):",
                 "Median ITL (ms):", "P50 E2EL (ms):"):
        assert line in text
