"""What the reliability checks read from a running server: its Prometheus metrics and its memory.

A check must not trust the client's view alone (a request the client saw finish may still hold KV
blocks), so every run ends by asking the server itself: no request running or waiting and no KV block
in use (``vllm:kv_cache_usage_perc`` counts blocks held by requests; blocks kept only for the prefix
cache are free). Memory is the resident set of the server process and all its descendants (the engine
core and worker processes), read from ``/proc``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class IdleState:
    """The server once it went idle (or the deadline passed)."""

    idle: bool
    seconds: float               # from the call until idle was seen
    running: float
    waiting: float
    kv_cache_usage: float


def parse_metrics(text: str) -> dict[str, float]:
    """Samples by name (label sets summed), e.g. ``vllm:num_requests_running`` or
    ``vllm:iteration_tokens_total_count``."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def histogram_buckets(text: str, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound (``inf`` included), label sets other than ``le``
    summed; empty when the server does not export it."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process descended from it (0 for processes already gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        current = todo.pop()
        try:
            total += int((Path("/proc") / str(current) / "statm").read_text().split()[1]) * page
        except OSError:
            pass
        todo.extend(children.get(current, []))
    return total


class ServerProbe:
    """Reads one server's metrics (``/metrics`` stays open when an API key is set)."""

    def __init__(self, base_url: str, pid: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.pid = pid

    async def metrics_text(self, client: httpx.AsyncClient) -> str:
        response = await client.get(f"{self.base_url}/metrics", timeout=10)
        response.raise_for_status()
        return response.text

    async def metrics(self, client: httpx.AsyncClient) -> dict[str, float]:
        return parse_metrics(await self.metrics_text(client))

    def rss_bytes(self) -> int | None:
        return process_tree_rss(self.pid) if self.pid is not None else None

    async def wait_idle(self, client: httpx.AsyncClient, timeout: float, interval: float = 0.01) -> IdleState:
        """Poll until nothing runs, waits or holds a KV block."""
        start = time.monotonic()
        current = await self.metrics(client)
        while True:
            running = current.get("vllm:num_requests_running", 0.0)
            waiting = current.get("vllm:num_requests_waiting", 0.0)
            usage = current.get("vllm:kv_cache_usage_perc", 0.0)
            idle = running == 0 and waiting == 0 and usage == 0
            elapsed = time.monotonic() - start
            if idle or elapsed > timeout:
                return IdleState(idle, elapsed, running, waiting, usage)
            await asyncio.sleep(interval)
            current = await self.metrics(client)
