"""``llmserve bench overload``: offered load well above capacity, then back below it.

Three phases against a server started with ``--max-num-queued-reqs``:

1. **capacity**: ``--concurrency`` clients send back to back; completed requests per second is the
   capacity, and their latency the baseline;
2. **overload**: requests arrive as a Poisson process at ``--overload-factor`` x capacity. The excess
   must be refused at once with 503 and ``Retry-After``, and an admitted request waits behind at most
   the queue limit's worth of requests, so its latency stays under ``--latency-slack`` x (queue limit
   / capacity + baseline p99);
3. **recovery**: arrivals at ``--recovery-factor`` x capacity: nothing refused, and latency back under
   ``--latency-slack`` x the baseline p99.

No request may fail in any phase (a 503 without ``Retry-After`` counts as a failure).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import httpx

from llmserve.benchmarks.reliability.check_run import (CheckTarget, client_for, count_kinds, failure_samples,
                                                      percentiles_ms)
from llmserve.benchmarks.reliability.stream_client import StreamOutcome, stream_completion


async def _closed_loop(client: httpx.AsyncClient, target: CheckTarget, rng: random.Random, concurrency: int,
                       seconds: float) -> tuple[list[StreamOutcome], float]:
    outcomes: list[StreamOutcome] = []
    start = time.monotonic()
    end = start + seconds

    async def loop() -> None:
        while time.monotonic() < end:
            outcomes.append(await stream_completion(client, target.base_url, target.model, target.request(rng),
                                                    target.headers))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return outcomes, time.monotonic() - start


async def _open_loop(client: httpx.AsyncClient, target: CheckTarget, rng: random.Random, rate: float,
                     seconds: float) -> list[StreamOutcome]:
    """Poisson arrivals: each request is sent at its time whatever happened to the earlier ones."""
    tasks: list[asyncio.Task[StreamOutcome]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tasks.append(asyncio.create_task(stream_completion(client, target.base_url, target.model,
                                                           target.request(rng), target.headers)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


def _phase(outcomes: list[StreamOutcome]) -> dict[str, Any]:
    admitted = [o.latency for o in outcomes if o.kind == "ok"]
    return {"requests": len(outcomes), **count_kinds(outcomes), "failures": failure_samples(outcomes),
            "latency_ms": percentiles_ms(admitted),
            "reject_ms": percentiles_ms([o.latency for o in outcomes if o.kind == "rejected"])}


async def run_overload(args: argparse.Namespace, target: CheckTarget) -> dict[str, Any]:
    rng = random.Random(args.seed)
    # an overloaded server queues up to the limit and admits a request only as one finishes
    async with client_for(args.concurrency + args.max_num_queued_reqs * 4 + 64) as client:
        baseline, seconds = await _closed_loop(client, target, rng, args.concurrency, args.capacity_seconds)
        finished = sum(o.kind == "ok" for o in baseline)
        if finished == 0:
            raise ValueError(f"no request finished within {args.capacity_seconds} s; the capacity is unknown")
        capacity = finished / seconds
        overload = await _open_loop(client, target, rng, capacity * args.overload_factor, args.overload_seconds)
        recovery = await _open_loop(client, target, rng, capacity * args.recovery_factor, args.recovery_seconds)
    phases = {"capacity": _phase(baseline), "overload": _phase(overload), "recovery": _phase(recovery)}
    base_p99 = phases["capacity"]["latency_ms"]["p99"] / 1000
    overload_bound = args.latency_slack * (args.max_num_queued_reqs / capacity + base_p99)
    recovery_bound = args.latency_slack * base_p99
    over_p99 = phases["overload"]["latency_ms"]["p99"]
    rec_p99 = phases["recovery"]["latency_ms"]["p99"]
    checks = {
        "no_failed_requests": all(p["failed"] == 0 for p in phases.values()),
        "excess_refused_with_retry_after": phases["overload"]["rejected"] > 0,
        "admitted_latency_bounded": over_p99 is not None and over_p99 / 1000 <= overload_bound,
        "recovered_nothing_refused": phases["recovery"]["rejected"] == 0,
        "recovered_latency": rec_p99 is not None and rec_p99 / 1000 <= recovery_bound,
    }
    return {"check": "overload", "capacity_requests_per_s": round(capacity, 2),
            "offered_requests_per_s": round(capacity * args.overload_factor, 2),
            "overload_latency_bound_ms": round(overload_bound * 1000, 1),
            "recovery_latency_bound_ms": round(recovery_bound * 1000, 1),
            **phases, "checks": checks}
