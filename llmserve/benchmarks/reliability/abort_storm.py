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

The step outputs the server reported between the last cancel and idle are reported too, but not
checked: they include steps computed before the aborts reached the core, which ran ahead of the front
end by up to one step.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
from pathlib import Path
from typing import Any

from llmserve.benchmarks.reliability.check_run import CheckTarget, client_for, count_kinds, failure_samples
from llmserve.benchmarks.reliability.server_probe import ServerProbe
from llmserve.benchmarks.reliability.stream_client import StreamRequest, stream_completion

TRACEBACK_MARKERS = re.compile(r"Traceback \(most recent call last\)|exception was never retrieved|"
                               r"Task exception|Exception in ASGI application")


def _log_since(path: Path | None, offset: int) -> str:
    if path is None:
        return ""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


ABORT_STEPS = "llmserve:abort_latency_steps"


def _largest_steps(before: dict[float, float], after: dict[float, float]) -> tuple[int, float | None]:
    """From a step histogram read before and after: how many aborts it counted meanwhile, and the upper
    bound of the bucket that holds the one that waited longest (None when none came)."""
    count = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if count == 0:
        return 0, None
    return int(count), min(bound for bound, n in after.items() if n - before.get(bound, 0.0) == count)


async def run_abort_storm(args: argparse.Namespace, target: CheckTarget) -> dict[str, Any]:
    probe = ServerProbe(target.base_url, target.pid)
    log_path = Path(args.server_log) if args.server_log else None
    log_offset = log_path.stat().st_size if log_path is not None else 0
    rng = random.Random(args.seed)
    output_len = args.max_cancel_chunks * 4 + 64     # no request may finish before its client hangs up
    requests = [StreamRequest(target.request(rng).prompt, output_len, rng.randint(0, args.max_cancel_chunks))
                for _ in range(args.requests)]
    async with client_for(args.requests) as client:
        steps_before = await probe.histogram(client, ABORT_STEPS)
        outcomes = await asyncio.gather(*(stream_completion(client, target.base_url, target.model, r, target.headers)
                                          for r in requests))
        idle = await probe.wait_idle(client, args.drain_timeout)
        steps_after = await probe.histogram(client, ABORT_STEPS)
    counts = count_kinds(list(outcomes))
    checks = {
        "every_request_cancelled": counts["cancelled"] == args.requests,
        "blocks_free_after_last_cancel": idle.idle,
    }
    report: dict[str, Any] = {
        "check": "abort-storm", "requests": args.requests, **counts, "failures": failure_samples(list(outcomes)),
        "seconds_to_idle_after_last_cancel": round(idle.seconds, 4),
        "step_outputs_after_last_cancel": idle.steps,
        "after": {"running": idle.running, "waiting": idle.waiting, "kv_cache_usage": idle.kv_cache_usage},
    }
    if steps_after:
        aborts, largest = _largest_steps(steps_before, steps_after)
        report.update(aborts_in_engine_core=aborts, most_steps_from_abort_to_free=largest)
        checks["blocks_free_within_steps_of_abort"] = (aborts == args.requests and largest is not None
                                                       and largest <= args.max_abort_steps)
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
