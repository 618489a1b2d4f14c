"""One streaming completion as a reliability check sees it: how it ended, not what it said.

The outcome separates what the server did wrong (``failed``: a connection error, an unexpected status,
an SSE error event, a stream that stops without ``[DONE]``) from what was asked of it (``cancelled``:
the client hung up on purpose; ``rejected``: 503 with ``Retry-After`` under overload).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class StreamOutcome:
    kind: str                          # ok | cancelled | rejected | failed
    status: int | None = None
    ttft: float | None = None          # seconds to the first streamed token
    latency: float = 0.0               # seconds to the end (or to the hang-up)
    chunks: int = 0
    detail: str = ""
    retry_after: str | None = None


@dataclass
class StreamRequest:
    """A completion of ``prompt`` token ids for ``max_tokens``; ``cancel_after`` chunks (None: read to the end)."""

    prompt: list[int]
    max_tokens: int
    cancel_after: int | None = None


def random_request(rng: random.Random, vocab: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                   disconnect_probability: float) -> StreamRequest:
    """Mixed lengths; with ``disconnect_probability`` the client hangs up after a random number of chunks."""
    length = rng.randint(*prompt_len)
    max_tokens = rng.randint(*output_len)
    cancel = rng.randint(0, max_tokens) if rng.random() < disconnect_probability else None
    return StreamRequest([rng.randrange(100, vocab) for _ in range(length)], max_tokens, cancel)


async def stream_completion(client: httpx.AsyncClient, base_url: str, model: str, request: StreamRequest,
                            headers: dict[str, str] | None = None) -> StreamOutcome:
    body: dict[str, Any] = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
                            "stream": True, "ignore_eos": True, "temperature": 0.0}
    start = time.monotonic()
    outcome = StreamOutcome("failed")
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body, headers=headers) as response:
            outcome.status = response.status_code
            if response.status_code == 503:
                outcome.retry_after = response.headers.get("retry-after")
                outcome.kind = "rejected" if outcome.retry_after else "failed"
                outcome.detail = (await response.aread()).decode(errors="replace")[:200]
                return outcome
            if response.status_code != 200:
                outcome.detail = (await response.aread()).decode(errors="replace")[:200]
                return outcome
            if request.cancel_after == 0:
                outcome.kind = "cancelled"   # hang up as soon as the server accepted the request
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    outcome.kind = "ok"
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.detail = json.dumps(event["error"])[:200]
                    break
                if outcome.chunks == 0:
                    outcome.ttft = time.monotonic() - start
                outcome.chunks += 1
                if request.cancel_after is not None and outcome.chunks >= request.cancel_after:
                    outcome.kind = "cancelled"
                    break      # leaving the block closes the connection: the server must abort it
            else:
                outcome.detail = "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        outcome.detail = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.latency = time.monotonic() - start
    return outcome
