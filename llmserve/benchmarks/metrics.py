"""Serving metrics computed as vLLM's ``benchmark_serving`` computes them, under the same JSON names.

Per request: TTFT (request sent to first content token), ITL (gaps between consecutive content chunks),
E2EL (request sent to last byte) and TPOT = (E2EL - TTFT) / (output tokens - 1) for requests with more
than one output token. Requests with one output token count a TPOT of 0 towards goodput, as vLLM does.
Goodput is the rate of requests that meet every SLO given (``ttft``, ``tpot``, ``e2el``, in ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class RequestResult:
    """What one request measured (times in seconds, ``start`` relative to the benchmark's start)."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    generated_text: str = ""
    error: str = ""

    def token_times(self) -> list[float]:
        """Times (from the benchmark's start) at which content arrived: first token, then each ITL gap."""
        if not self.success or self.ttft <= 0:
            return []
        times = [self.start + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times


def parse_metric_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in METRIC_NAMES]
    if bad:
        raise ValueError(f"unknown metric {bad[0]!r} in --percentile-metrics; choose from {', '.join(METRIC_NAMES)}")
    return names


def parse_percentiles(value: str) -> list[float]:
    try:
        percentiles = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles must be comma-separated numbers, got {value!r}") from None
    if not percentiles or any(not 0 < p <= 100 for p in percentiles):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {value!r}")
    return percentiles


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """vLLM's ``--goodput`` format: ``KEY:VALUE`` pairs in ms, keys among ttft, tpot, e2el."""
    slos: dict[str, float] = {}
    for item in items or []:
        for pair in item.replace(",", " ").split():
            key, sep, value = pair.partition(":")
            if not sep or key not in GOODPUT_METRICS:
                raise ValueError(f"invalid --goodput {pair!r}: use KEY:VALUE in ms with KEY one of "
                                 f"{', '.join(GOODPUT_METRICS)} (e.g. ttft:500 tpot:50)")
            try:
                slos[key] = float(value)
            except ValueError:
                raise ValueError(f"invalid --goodput value in {pair!r}: not a number") from None
            if slos[key] < 0:
                raise ValueError(f"invalid --goodput {pair!r}: SLOs must be >= 0")
    return slos


def percentile_key(metric: str, p: float) -> str:
    return f"p{p:g}_{metric}_ms"


def percentile_stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean/median/std and the chosen percentiles of ``values_s`` (seconds), reported in ms as vLLM does
    (an empty list reports zeros)."""
    arr = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000
    stats = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
             f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        stats[percentile_key(name, p)] = float(np.percentile(arr, p))
    return stats


def peak_output_rate(results: list[RequestResult]) -> tuple[float, int]:
    """(most output tokens in any one-second window, most requests in flight at once)."""
    times = sorted(t for r in results for t in r.token_times())
    peak_tokens = 0
    if times:
        counts = np.bincount(np.floor(np.asarray(times)).astype(np.int64))
        peak_tokens = int(counts.max())
    events = sorted([(r.start, 1) for r in results if r.success] + [(r.start + r.latency, -1) for r in results
                                                                     if r.success])
    in_flight = peak = 0
    for _, delta in events:
        in_flight += delta
        peak = max(peak, in_flight)
    return float(peak_tokens), peak


def compute_metrics(results: list[RequestResult], duration: float, percentiles: list[float],
                    selected: list[str] | None = None, goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """vLLM's benchmark_serving figures for ``results`` gathered over ``duration`` seconds."""
    selected = list(METRIC_NAMES) if selected is None else selected
    ok = [r for r in results if r.success]
    in_tokens = sum(r.prompt_len for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    tpots: list[float] = []
    all_tpots: list[float] = []
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        if r.output_tokens > 1:
            tpots.append(tpot)
        all_tpots.append(tpot)
    duration = max(duration, 1e-9)
    metrics: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "request_goodput": None,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    if goodput:
        per_request = {"ttft": [r.ttft for r in ok], "tpot": all_tpots, "e2el": [r.latency for r in ok]}
        good = 0
        for i in range(len(ok)):
            if all(per_request[key][i] * 1000 <= slo for key, slo in goodput.items()):
                good += 1
        metrics["request_goodput"] = good / duration
    peak_tokens, peak_requests = peak_output_rate(ok)
    metrics["max_output_tokens_per_s"] = peak_tokens
    metrics["max_concurrent_requests"] = peak_requests
    values = {"ttft": [r.ttft for r in ok], "tpot": tpots, "itl": [x for r in ok for x in r.itl],
              "e2el": [r.latency for r in ok]}
    for name in selected:
        metrics.update(percentile_stats(name, values[name], percentiles))
    metrics["input_lens"] = [r.prompt_len for r in results]
    metrics["output_lens"] = [r.output_tokens for r in results]
    metrics["ttfts"] = [r.ttft for r in results]
    metrics["itls"] = [r.itl for r in results]
    metrics["generated_texts"] = [r.generated_text for r in results]
    metrics["errors"] = [r.error for r in results]
    return metrics


DETAIL_FIELDS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors")


def format_report(metrics: dict[str, Any], percentiles: list[float], selected: list[str]) -> str:
    """The result table, laid out as vLLM's benchmark_serving prints it."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append("{:<40} {:<10}".format(label, format(value, fmt) if fmt else value))

    row("Successful requests:", metrics["completed"])
    if metrics.get("failed"):
        row("Failed requests:", metrics["failed"])
    row("Benchmark duration (s):", metrics["duration"], ".2f")
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"], ".2f")
    if metrics.get("request_goodput") is not None:
        row("Request goodput (req/s):", metrics["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", metrics["output_throughput"], ".2f")
    row("Peak output token throughput (tok/s):", metrics["max_output_tokens_per_s"], ".2f")
    row("Peak concurrent requests:", metrics["max_concurrent_requests"])
    row("Total Token throughput (tok/s):", metrics["total_token_throughput"], ".2f")
    if metrics.get("client_cpu_s") is not None:
        row("Load generator CPU time (s):", metrics["client_cpu_s"], ".2f")
    for name in selected:
        lines.append("{s:{c}^{n}}".format(s=METRIC_TITLES[name], n=50, c="-"))
        label = name.upper()
        row(f"Mean {label} (ms):", metrics[f"mean_{name}_ms"], ".2f")
        row(f"Median {label} (ms):", metrics[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            row(f"P{p:g} {label} (ms):", metrics[percentile_key(name, p)], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)
