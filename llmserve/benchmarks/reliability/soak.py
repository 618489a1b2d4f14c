"""``llmserve bench soak``: many streaming clients for a long time, some hanging up at random.

Each client sends one request after another (mixed prompt and output lengths) until the time is up;
with ``--disconnect-probability`` a request is dropped after a random number of chunks. Then the load
stops and the server must drain. The promises checked:

* no request fails that the client did not cancel;
* after the drain nothing runs or waits and no KV block is held;
* the server's memory (with its engine and worker processes) grows less than ``--max-rss-growth``
  between the end of the warm-up and the end of the drain (allocator pools and caches fill during the
  warm-up; a leak keeps growing after it);
* p50/p99 TTFT, reported.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from llmserve.benchmarks.reliability.check_run import (CheckTarget, client_for, count_kinds, failure_samples,
                                                      percentiles_ms)
from llmserve.benchmarks.reliability.server_probe import ServerProbe
from llmserve.benchmarks.reliability.stream_client import StreamOutcome, stream_completion


async def run_soak(args: argparse.Namespace, target: CheckTarget) -> dict[str, Any]:
    probe = ServerProbe(target.base_url, target.pid)
    outcomes: list[StreamOutcome] = []
    start = time.monotonic()
    end = start + args.duration
    warmed_at = start + args.duration * args.warmup_fraction
    rss: dict[str, int | None] = {"warm": None}

    async def client_loop(index: int) -> None:
        rng = random.Random(args.seed * 1_000_003 + index)
        await asyncio.sleep(rng.random() * args.ramp_up)   # clients arrive spread over the ramp-up
        while time.monotonic() < end:
            request = target.request(rng, args.disconnect_probability)
            outcomes.append(await stream_completion(client, target.base_url, target.model, request, target.headers))

    async def measure_warm_rss() -> None:
        await asyncio.sleep(max(0.0, warmed_at - time.monotonic()))
        rss["warm"] = probe.rss_bytes()

    async with client_for(args.clients) as client:
        await asyncio.gather(measure_warm_rss(), *(client_loop(i) for i in range(args.clients)))
        load_seconds = time.monotonic() - start
        idle = await probe.wait_idle(client, args.drain_timeout)
    rss_end = probe.rss_bytes()
    counts = count_kinds(outcomes)
    growth = None if rss["warm"] in (None, 0) or rss_end is None else (rss_end - rss["warm"]) / rss["warm"]
    checks = {
        "no_failed_requests": counts["failed"] == 0 and counts["rejected"] == 0,
        "drained_with_no_blocks_held": idle.idle,
    }
    if growth is not None:
        checks["rss_growth_below_limit"] = growth < args.max_rss_growth
    return {
        "check": "soak", "clients": args.clients, "duration_s": round(load_seconds, 1),
        "requests": len(outcomes), **counts, "failures": failure_samples(outcomes),
        "requests_per_s": round(len(outcomes) / load_seconds, 2),
        "streamed_chunks": sum(o.chunks for o in outcomes),
        "ttft_ms": percentiles_ms([o.ttft for o in outcomes if o.ttft is not None]),
        "drain_s": round(idle.seconds, 3), "after_drain": {"running": idle.running, "waiting": idle.waiting,
                                                          "kv_cache_usage": idle.kv_cache_usage},
        "rss_warm_mib": None if rss["warm"] is None else round(rss["warm"] / 2**20, 1),
        "rss_end_mib": None if rss_end is None else round(rss_end / 2**20, 1),
        "rss_growth": None if growth is None else round(growth, 4),
        "checks": checks,
    }
