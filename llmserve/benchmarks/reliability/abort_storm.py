"""``llmserve bench abort-storm``: many concurrent streams, every one cancelled at a random point.

All requests start together with outputs far longer than any cancel point, so each ends by the
client hanging up (after 0 to ``--max-cancel-chunks`` chunks). The promises checked:

* the server goes idle after the last cancel: every KV block free, nothing running or waiting (the
  seconds it took are reported);
* every abort freed its request's blocks within ``--max-abort-steps`` engine steps of reaching the
  engine core, as the server's ``llmserve:abort_latency_steps`` histogram counts them: 1 is the step in
  flight when it came (a server that does not export it is not checked on this);
* with ``--server-log``: the log carries one "aborted" line per request and no traceback (an unretrieved
  task exception, a stack dump) since the storm began.

Steps are counted in the core, from an abort's arrival: the step outputs the front end reports after the
last cancel are no measure of it, as they include a step the core computed ahead, before the abort came
(its blocks were freed in time), and miss the steps run while the front end had not yet turned the
hang-up into an abort, which the seconds to idle include.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
from pathlib import Path
from typing import Any

from llmserve.benchmarks.reliability.check_run import CheckTarget, client_for, count_kinds, failure_samples
from llmserve.benchmarks.reliability.server_probe import ServerProbe, histogram_buckets, parse_metrics
from llmserve.benchmarks.reliability.stream_client import StreamRequest, stream_completion

TRACEBACK_MARKERS = re.compile(r"Traceback \(most recent call last\)|exception was never retrieved|"
                               r"Task exception|Exception in ASGI application")
ABORT_STEPS = "llmserve:abort_latency_steps"             # the server's histogram of each abort's wait
ABORT_SECONDS = "llmserve:abort_latency_seconds_sum"


def _log_since(path: Path | None, offset: int) -> str:
    if path is None:
        return ""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def abort_wait_check(before: str, after: str, requests: int, max_steps: int) -> tuple[dict[str, Any], bool] | None:
    """From the server's /metrics text before and after the storm: how many aborts the engine core counted
    meanwhile, the most steps one of them waited (the upper bound of its histogram bucket) and their mean
    seconds, and whether there was one per request and none waited more than ``max_steps``; None when the
    server does not export the histogram."""
    buckets_after = histogram_buckets(after, ABORT_STEPS)
    if not buckets_after:
        return None
    buckets_before = histogram_buckets(before, ABORT_STEPS)
    aborts = int(buckets_after[float("inf")] - buckets_before.get(float("inf"), 0.0))
    largest = min(bound for bound, n in buckets_after.items()
                  if n - buckets_before.get(bound, 0.0) == aborts) if aborts else None
    seconds = parse_metrics(after).get(ABORT_SECONDS, 0.0) - parse_metrics(before).get(ABORT_SECONDS, 0.0)
    report = {"aborts_in_engine_core": aborts, "most_steps_from_abort_to_free": largest,
              "mean_seconds_from_abort_to_free": round(seconds / aborts, 4) if aborts else None}
    return report, aborts == requests and largest is not None and largest <= max_steps


async def run_abort_storm(args: argparse.Namespace, target: CheckTarget) -> dict[str, Any]:
    probe = ServerProbe(target.base_url, target.pid)
    log_path = Path(args.server_log) if args.server_log else None
    log_offset = log_path.stat().st_size if log_path is not None else 0
    rng = random.Random(args.seed)
    output_len = args.max_cancel_chunks * 4 + 64     # no request may finish before its client hangs up
    requests = [StreamRequest(target.request(rng).prompt, output_len, rng.randint(0, args.max_cancel_chunks))
                for _ in range(args.requests)]
    async with client_for(args.requests) as client:
        before = await probe.metrics_text(client)
        outcomes = await asyncio.gather(*(stream_completion(client, target.base_url, target.model, r, target.headers)
                                          for r in requests))
        idle = await probe.wait_idle(client, args.drain_timeout)
        after = await probe.metrics_text(client)
    counts = count_kinds(list(outcomes))
    checks = {
        "every_request_cancelled": counts["cancelled"] == args.requests,
        "blocks_free_after_last_cancel": idle.idle,
    }
    report: dict[str, Any] = {
        "check": "abort-storm", "requests": args.requests, **counts, "failures": failure_samples(list(outcomes)),
        "seconds_to_idle_after_last_cancel": round(idle.seconds, 4),
        "after": {"running": idle.running, "waiting": idle.waiting, "kv_cache_usage": idle.kv_cache_usage},
    }
    waits = abort_wait_check(before, after, args.requests, args.max_abort_steps)
    if waits is not None:
        report.update(waits[0])
        checks["blocks_free_within_steps_of_abort"] = waits[1]
    if log_path is not None:
        await asyncio.sleep(args.log_settle)     # the server writes its abort lines as it sees each hang-up
        text = _log_since(log_path, log_offset)
        aborted = sum(1 for line in text.splitlines() if "aborted" in line)
        tracebacks = len(TRACEBACK_MARKERS.findall(text))
        report.update(abort_log_lines=aborted, traceback_lines=tracebacks)
        checks["one_log_line_per_abort"] = aborted == args.requests
        checks["no_tracebacks_in_log"] = tracebacks == 0
    report["checks"] = checks
    return report
