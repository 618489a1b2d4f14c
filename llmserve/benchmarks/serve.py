"""``llmserve bench serve``: load an OpenAI-compatible server with streaming requests and report what
vLLM's benchmark_serving reports (same JSON field names): throughput, TTFT, TPOT, ITL and E2E latency.

Prompts are random token ids (``--random-input-len``) sent as token-id prompts to /v1/completions with
``ignore_eos`` so every request produces exactly ``--random-output-len`` tokens; requests arrive all at
once (``--request-rate inf``) or as a Poisson process, at most ``--max-concurrency`` in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def percentile_stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean/median/std and chosen percentiles of ``values_s`` (seconds), reported in ms as vLLM does."""
    arr = np.asarray(values_s or [0.0]) * 1000
    stats = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
             f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        stats[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p))
    return stats


def compute_metrics(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    metrics: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    metrics.update(percentile_stats("ttft", [r.ttft for r in ok], percentiles))
    metrics.update(percentile_stats("tpot", tpots, percentiles))
    metrics.update(percentile_stats("itl", [x for r in ok for x in r.itl], percentiles))
    metrics.update(percentile_stats("e2el", [r.latency for r in ok], percentiles))
    return metrics


async def send_completion(client: Any, url: str, model: str, prompt: list[int], output_len: int,
                          headers: dict[str, str]) -> RequestResult:
    result = RequestResult(prompt_len=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:500]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.success = result.error == ""
    except Exception as exc:   # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_benchmark(base_url: str, model: str, prompts: list[list[int]], output_len: int,
                        request_rate: float, max_concurrency: int | None, seed: int,
                        api_key: str | None = None) -> tuple[list[RequestResult], float]:
    import httpx

    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def one(prompt: list[int]) -> RequestResult:
            async with semaphore:
                return await send_completion(client, f"{base_url}/v1/completions", model, prompt, output_len,
                                             headers)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(one(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def random_token_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(num)]


def run_serve_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"]
    model = args.model or models[0]["id"]
    vocab = args.vocab_size
    prompts = random_token_prompts(args.num_prompts, args.random_input_len, vocab, args.seed)
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    results, duration = asyncio.run(run_benchmark(base_url, model, prompts, args.random_output_len,
                                                  args.request_rate, args.max_concurrency, args.seed, args.api_key))
    metrics = compute_metrics(results, duration, percentiles)
    print(f"{'Successful requests:':<40}{metrics['completed']:>10}")
    print(f"{'Failed requests:':<40}{metrics['failed']:>10}")
    print(f"{'Benchmark duration (s):':<40}{duration:>10.2f}")
    print(f"{'Total input tokens:':<40}{metrics['total_input_tokens']:>10}")
    print(f"{'Total generated tokens:':<40}{metrics['total_output_tokens']:>10}")
    print(f"{'Request throughput (req/s):':<40}{metrics['request_throughput']:>10.2f}")
    print(f"{'Output token throughput (tok/s):':<40}{metrics['output_throughput']:>10.2f}")
    print(f"{'Total token throughput (tok/s):':<40}{metrics['total_token_throughput']:>10.2f}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        print(f"{name.upper()}: mean {metrics[f'mean_{name}_ms']:.1f} ms, median {metrics[f'median_{name}_ms']:.1f} ms"
              + "".join(f", p{p:g} {metrics[f'p{p:g}_{name}_ms']:.1f} ms" for p in percentiles))
    failures = [r.error for r in results if not r.success]
    if failures:
        print(f"first failure: {failures[0]}")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics
