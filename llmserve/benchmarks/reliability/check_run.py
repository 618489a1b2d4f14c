"""What the reliability checks share: their command-line target, the load they send and their verdict.

Each check (``llmserve bench soak|abort-storm|overload``) loads a running server, then prints a JSON
report whose ``checks`` map each promise to pass/fail, and exits 1 when any failed, so the same
command is a CI step (short), a benchmark (long) and a figure in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from llmserve.benchmarks.reliability.stream_client import StreamOutcome, StreamRequest, random_request


@dataclass
class CheckTarget:
    base_url: str
    model: str
    headers: dict[str, str]
    vocab_size: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    pid: int | None

    def request(self, rng: random.Random, disconnect_probability: float = 0.0) -> StreamRequest:
        return random_request(rng, self.vocab_size, self.prompt_len, self.output_len, disconnect_probability)


def resolve_check_target(args: argparse.Namespace) -> CheckTarget:
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model
    if model is None:
        try:
            models = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).raise_for_status().json()
        except httpx.HTTPError as exc:
            raise ValueError(f"cannot list the models of {base_url}: {exc}") from None
        if not models.get("data"):
            raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
        model = models["data"][0]["id"]
    return CheckTarget(base_url, model, headers, args.vocab_size, args.prompt_len, args.output_len, args.server_pid)


def client_for(connections: int) -> httpx.AsyncClient:
    """One pool sized for the load, no timeout (a check measures how long things take; it never gives up)."""
    limits = httpx.Limits(max_connections=connections + 8, max_keepalive_connections=connections + 8)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None))


def count_kinds(outcomes: list[StreamOutcome]) -> dict[str, int]:
    counts = {"ok": 0, "cancelled": 0, "rejected": 0, "failed": 0}
    for outcome in outcomes:
        counts[outcome.kind] += 1
    return counts


def percentiles_ms(values: list[float], points: tuple[float, ...] = (50, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p:g}": None for p in points}
    return {f"p{p:g}": float(np.percentile(np.array(values) * 1000, p)) for p in points}


def failure_samples(outcomes: list[StreamOutcome], limit: int = 5) -> list[str]:
    return [f"status={o.status} {o.detail}" for o in outcomes if o.kind == "failed"][:limit]


def finish(report: dict[str, Any], args: argparse.Namespace) -> int:
    """Print (and save) the report; the exit status says whether every check held."""
    report["passed"] = all(report["checks"].values())
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(text + "\n")
    if not report["passed"]:
        failed = [name for name, ok in report["checks"].items() if not ok]
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 0 if report["passed"] else 1
