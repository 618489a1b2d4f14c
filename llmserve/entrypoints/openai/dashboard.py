"""The live dashboard: ``GET /dashboard`` (one self-contained HTML page, packaged with llmserve) and
``GET /dashboard/stats`` (the JSON it polls every second).

The stats are the engine's own gauges and cumulative counters plus the Prometheus histograms /metrics
exports, so the page and Grafana agree; the page turns counters into rates (tokens/s, hit rate, mean and
p90 latency per interval) from the difference between two polls, timed by the server's clock. The KV-cache
block map is asked of the engine core at each poll. The page loads nothing from the network but its stats
(its Content-Security-Policy forbids anything else), so it works on an air-gapped cluster.
"""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import Any

from fastapi.responses import HTMLResponse
from prometheus_client import CollectorRegistry

from llmserve.engine.async_engine import AsyncLLMEngine
from llmserve.metrics.prometheus import EngineMetrics

MAX_BLOCK_MAP_CELLS = 2048   # more blocks than this share cells (the grid stays readable and the poll small)
LATENCY_HISTOGRAMS = {"ttft": "vllm:time_to_first_token_seconds", "itl": "vllm:inter_token_latency_seconds"}
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def _page_html() -> str:
    return resources.files("llmserve.entrypoints.openai").joinpath("static/dashboard.html").read_text("utf-8")


def dashboard_page() -> HTMLResponse:
    return HTMLResponse(_page_html(), headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store",
                                               "Referrer-Policy": "no-referrer"})


async def dashboard_stats(engine: AsyncLLMEngine, metrics: EngineMetrics) -> dict[str, Any]:
    """One poll's figures: gauges as they are now, counters and histograms cumulative since start."""
    block_map = await engine.block_map(MAX_BLOCK_MAP_CELLS)
    stats = engine.stats()
    return {
        "time": time.monotonic(),
        "model": metrics.model_name,
        "requests": {"running": stats["num_requests_running"], "waiting": stats["num_requests_waiting"]},
        "kv_cache": {
            "num_blocks": stats["num_blocks"], "num_free_blocks": stats["num_free_blocks"],
            "usage": stats["kv_cache_usage"], "block_size": engine.info.config.block_size,
            "block_map": None if block_map is None else {
                "blocks_per_cell": block_map.blocks_per_cell, "in_use": block_map.in_use,
                "cached": block_map.cached},
        },
        "prefix_cache": {"queries": stats["prefix_cache_queries"], "hits": stats["prefix_cache_hits"]},
        "tokens": {"prompt": stats["prompt_tokens"], "generation": stats["generation_tokens"]},
        "num_preemptions": stats["num_preemptions"],
        "latency": _histograms(metrics.registry),
    }


def _histograms(registry: CollectorRegistry) -> dict[str, dict[str, Any]]:
    """``{key: {"count", "sum", "le": [bounds], "buckets": [cumulative counts]}}`` of each latency
    histogram (the finite buckets; ``count`` is the +Inf one)."""
    wanted = {name: key for key, name in LATENCY_HISTOGRAMS.items()}
    result: dict[str, dict[str, Any]] = {}
    for family in registry.collect():
        key = wanted.get(family.name)
        if key is None:
            continue
        entry: dict[str, Any] = {"count": 0, "sum": 0.0, "le": [], "buckets": []}
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
                entry["le"].append(float(sample.labels["le"]))
                entry["buckets"].append(sample.value)
            elif sample.name.endswith("_count"):
                entry["count"] = sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
        result[key] = entry
    return result
