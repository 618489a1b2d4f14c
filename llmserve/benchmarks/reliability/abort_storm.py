"""``llmserve bench abort-storm``: many concurrent streams, every one cancelled at a random point.

All requests start together with outputs far longer than any cancel point, so each ends by the
client hanging up (after 0 to ``--max-cancel-chunks`` chunks). The promises checked:

* every KV block is free, with nothing running or waiting, within ``--max-steps-after-cancel`` engine
  steps of the last cancel (a streamed disconnect is seen when the server next writes to it, so the
  step in flight and the one whose tokens reveal the hang-up may still run);
* with ``--server-log``: the log carries one "aborted" line per request and no traceback (an unretrieved
  task exception, a stack dump) since the storm began.
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


async def run_abort_storm(args: argparse.Namespace, target: CheckTarget) -> dict[str, Any]:
    probe = ServerProbe(target.base_url, target.pid)
    log_path = Path(args.server_log) if args.server_log else None
    log_offset = log_path.stat().st_size if log_path is not None else 0
    rng = random.Random(args.seed)
    output_len = args.max_cancel_chunks * 4 + 64     # no request may finish before its client hangs up
    requests = [StreamRequest(target.request(rng).prompt, output_len, rng.randint(0, args.max_cancel_chunks))
                for _ in range(args.requests)]
    async with client_for(args.requests) as client:
        outcomes = await asyncio.gather(*(stream_completion(client, target.base_url, target.model, r, target.headers)
                                          for r in requests))
        idle = await probe.wait_idle(client, args.drain_timeout)
    counts = count_kinds(list(outcomes))
    checks = {
        "every_request_cancelled": counts["cancelled"] == args.requests,
        "blocks_free_after_last_cancel": idle.idle and idle.steps <= args.max_steps_after_cancel,
    }
    report: dict[str, Any] = {
        "check": "abort-storm", "requests": args.requests, **counts, "failures": failure_samples(list(outcomes)),
        "seconds_to_idle_after_last_cancel": round(idle.seconds, 4),
        "engine_steps_after_last_cancel": idle.steps,
        "after": {"running": idle.running, "waiting": idle.waiting, "kv_cache_usage": idle.kv_cache_usage},
    }
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
