"""``llmserve bench serve``: load any OpenAI-compatible server with streaming requests and report what
vLLM's ``benchmark_serving`` reports, under the same JSON field names (see :mod:`.metrics`).

Requests (see :mod:`.datasets`):

* ``--dataset-name random``: ``--random-input-len`` / ``--random-output-len`` tokens, spread by
  ``--random-range-ratio``, after a shared ``--random-prefix-len`` prefix; token-id prompts on
  ``/v1/completions`` (ids below ``--vocab-size``, else of the ``--tokenizer``'s vocabulary, else those the
  server's ``/tokenize`` gives the bundled corpus), corpus text on ``/v1/chat/completions``;
* ``--dataset-name sharegpt``: ShareGPT-shaped lengths (synthetic, no download) or a ShareGPT JSON file
  given with ``--dataset-path``; prompts are text;
* ``--dataset-name prefix_repetition`` (or ``prefix-repetition``): a few long shared prefixes with random
  suffixes (prefix caching).

Every request streams (``stream_options.include_usage``) and is greedy unless ``--temperature`` etc. say
otherwise; by default it also sends ``ignore_eos`` so each produces exactly its expected output length
(``--no-ignore-eos`` for servers that refuse the field). Requests arrive all at once (``--request-rate
inf``) or as a Poisson process (gamma with ``--burstiness`` != 1), at most ``--max-concurrency`` in
flight. Token counts come from the ``usage`` of each response; where a server sends none, from the
tokenizer (``--tokenizer``, else the server's ``/tokenize``), else one token per streamed chunk.

The flags are vLLM's (:mod:`.serve_args`), and so is the result file (:mod:`.results`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgspec
import numpy as np

from llmserve.benchmarks.datasets import (SHAREGPT_MAX_TOTAL_LEN, ApproxTokenizer, CorpusText,
                                          HFTokenizer, SampleRequest, ServerTokenizer, TextTokenizer,
                                          allowed_token_ids, load_sharegpt, sample_prefix_repetition, sample_random,
                                          sample_sharegpt_synthetic)
from llmserve.benchmarks.metrics import (DETAIL_FIELDS, RequestResult, compute_metrics, format_report,
                                         parse_goodput, parse_metric_list, parse_percentiles)
from llmserve.benchmarks.results import check_result_args, default_filename, save_result, saving
from llmserve.benchmarks.serve_args import (CHAT_ENDPOINT, MIN_TOKEN_ID, TOKEN_ID_DATASETS, check_serve_args,
                                            resolve_url, sampling_fields)

CHAT_TEMPLATE_MARGIN = 64   # tokens a chat template may add around the prompt


# ------------------------------------------------------------------------------------------- target


@dataclass
class Target:
    base_url: str
    endpoint: str
    model: str
    backend: str = "openai"
    headers: dict[str, str] = field(default_factory=dict)
    max_model_len: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)   # fields every request carries

    @property
    def url(self) -> str:
        return self.base_url + self.endpoint

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT_ENDPOINT


def resolve_target(args: argparse.Namespace) -> Target:
    """The model name and context length from ``/v1/models`` (``--served-model-name`` or ``--model`` picks
    among several)."""
    missing = [name for name in ("httpx", "aiohttp") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"bench serve / sweep need {' and '.join(missing)}: pip install 'llmserve[bench]'")
    import httpx

    base_url, endpoint, backend = resolve_url(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    named = args.served_model_name or args.model
    models: list[dict[str, Any]] = []
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        if response.status_code == 200:
            models = response.json().get("data", [])
        elif named is None:
            raise ValueError(f"GET {base_url}/v1/models answered {response.status_code}; pass --model")
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach {base_url}: {exc}") from None
    if named is None and not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    model = named or models[0]["id"]
    max_len = next((m.get("max_model_len") for m in models if m.get("id") == model), None)
    return Target(base_url, endpoint, model, backend, headers, int(max_len) if max_len else None,
                  sampling_fields(args, endpoint == CHAT_ENDPOINT))


def resolve_tokenizer(args: argparse.Namespace, target: Target) -> TextTokenizer:
    if args.tokenizer:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=args.trust_remote_code),
                           args.tokenizer)
    return ServerTokenizer.probe(target.base_url, target.model, target.headers) or ApproxTokenizer()


def token_id_pool(args: argparse.Namespace, tokenizer: TextTokenizer) -> list[int]:
    """The ids random token-id prompts draw from: ids of the served model's vocabulary, no special ones (a
    server refuses a prompt with an id past its vocabulary)."""
    if args.vocab_size is not None:
        return allowed_token_ids(args.vocab_size, low=MIN_TOKEN_ID)
    if isinstance(tokenizer, HFTokenizer):
        return allowed_token_ids(tokenizer.vocab_size, tokenizer.special_ids)
    if isinstance(tokenizer, ServerTokenizer):
        return tokenizer.corpus_token_ids
    raise ValueError("token-id prompts need the model's vocabulary, and the server has no /tokenize to learn it "
                     "from: pass --vocab-size (or --tokenizer)")


def build_requests(args: argparse.Namespace, target: Target,
                   tokenizer: TextTokenizer) -> list[SampleRequest]:
    """The benchmark's requests: token ids for random / prefix-repetition on /v1/completions, text otherwise."""
    token_prompts = not target.chat and args.dataset_name in TOKEN_ID_DATASETS
    ids = token_id_pool(args, tokenizer) if token_prompts else None
    corpus = None if token_prompts else CorpusText(tokenizer)
    if args.dataset_name == "random":
        return sample_random(args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.seed, token_ids=ids, corpus=corpus,
                             prefix_len=args.random_prefix_len)
    if args.dataset_name == "prefix-repetition":
        return sample_prefix_repetition(args.num_prompts, args.prefix_repetition_prefix_len,
                                        args.prefix_repetition_suffix_len, args.prefix_repetition_num_prefixes,
                                        args.prefix_repetition_output_len, args.seed, token_ids=ids, corpus=corpus)
    max_total = SHAREGPT_MAX_TOTAL_LEN
    if target.max_model_len:
        max_total = min(max_total, target.max_model_len - (CHAT_TEMPLATE_MARGIN if target.chat else 0))
    if args.dataset_path:
        return load_sharegpt(args.dataset_path, args.num_prompts, tokenizer, args.seed, args.sharegpt_output_len,
                             max_total)
    assert corpus is not None
    return sample_sharegpt_synthetic(args.num_prompts, corpus, args.seed, max_total, args.sharegpt_output_len)


# ------------------------------------------------------------------------------------------- requests


def request_body(target: Target, request: SampleRequest, ignore_eos: bool,
                 max_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, **target.sampling, "stream": True,
                            "stream_options": {"include_usage": True}}
    tokens = max_tokens if max_tokens is not None else request.expected_output_len
    if target.chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = tokens
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = tokens
    if ignore_eos:
        body["ignore_eos"] = True
    return body


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None      # completions
    delta: _Delta | None = None  # chat


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    """The fields of a streamed chunk the metrics need; the decoder skips every other one unparsed."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _chunk_text(chunk: _Chunk, chat: bool) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    if chat:
        return (choice.delta.content if choice.delta is not None else None) or ""
    return choice.text or ""


async def _sse_data(response: Any) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent event stream, up to ``[DONE]``."""
    pending = b""
    async for piece in response.content.iter_any():
        lines = (pending + piece).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield data


async def send_request(client: Any, target: Target, request: SampleRequest, ignore_eos: bool,
                       bench_start: float, max_tokens: int | None = None) -> RequestResult:
    """Stream one request; TTFT is the first chunk with content, ITLs the gaps between content chunks."""
    result = RequestResult(prompt_len=request.prompt_len)
    body = request_body(target, request, ignore_eos, max_tokens)
    start = time.perf_counter()
    result.start = start - bench_start
    last = start
    pieces: list[str] = []
    chunks = 0
    try:
        async with client.post(target.url, json=body, headers=target.headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: " + (await response.read()).decode(errors="replace")[:500]
                return result
            async for data in _sse_data(response):
                chunk = _decode_chunk(data)
                if chunk.error is not None:
                    error = chunk.error
                    result.error = error.get("message", str(error)) if isinstance(error, dict) else str(error)
                    return result
                usage = chunk.usage
                if usage:
                    result.output_tokens = int(usage.completion_tokens or 0)
                    if usage.prompt_tokens:
                        result.prompt_len = int(usage.prompt_tokens)
                text = _chunk_text(chunk, target.chat)
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    pieces.append(text)
        result.latency = time.perf_counter() - start
        result.generated_text = "".join(pieces)
        if chunks == 0:
            result.error = "the response streamed no content"
        elif result.output_tokens == 0:
            result.output_tokens = -chunks   # no usage: counted later (negative = chunk count)
        result.success = result.error == ""
    except Exception as exc:   # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def arrival_gaps(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait after each request before sending the next (gamma/Poisson, as vLLM draws them)."""
    if request_rate == float("inf"):
        return [0.0] * num
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be > 0")
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num).tolist()


async def run_benchmark(target: Target, requests: list[SampleRequest], request_rate: float,
                        max_concurrency: int | None = None, seed: int = 0, burstiness: float = 1.0,
                        ignore_eos: bool = True, disable_tqdm: bool = False,
                        description: str = "") -> tuple[list[RequestResult], float]:
    """Send ``requests`` and return their results and the wall time from the first send to the last byte."""
    from tqdm.auto import tqdm

    gaps = arrival_gaps(len(requests), request_rate, burstiness, seed)
    semaphore = asyncio.Semaphore(max_concurrency if max_concurrency is not None else len(requests))
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc=description or None, unit="req", file=sys.stderr)
    async with streaming_session() as client:
        start = time.perf_counter()

        async def one(request: SampleRequest) -> RequestResult:
            async with semaphore:
                result = await send_request(client, target, request, ignore_eos, start)
            bar.update(1)
            return result

        tasks = []
        for request, gap in zip(requests, gaps):
            tasks.append(asyncio.ensure_future(one(request)))
            if gap:
                await asyncio.sleep(gap)
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def streaming_session() -> Any:
    """The load generator's HTTP client: aiohttp, as vLLM's benchmark client, whose C parser takes a fraction of
    the CPU per streamed event that httpx's pure-Python stack does (on a small machine the load generator
    shares the cores with the server it measures). No limit on connections; no timeout but connecting's."""
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=60),
                                 connector=aiohttp.TCPConnector(limit=0))


async def warm_up(target: Target, request: SampleRequest, ignore_eos: bool) -> RequestResult:
    async with streaming_session() as client:
        return await send_request(client, target, request, ignore_eos, time.perf_counter(),
                                  max_tokens=min(4, request.expected_output_len))


def count_missing_output_tokens(results: list[RequestResult], tokenizer: TextTokenizer) -> None:
    """Requests whose response had no usage: count their text with the tokenizer (or keep the chunk count)."""
    for r in results:
        if r.output_tokens < 0:
            chunks = -r.output_tokens
            r.output_tokens = len(tokenizer.encode(r.generated_text)) if tokenizer.exact else chunks


def benchmark_at_rate(target: Target, requests: list[SampleRequest], tokenizer: TextTokenizer, rate: float,
                      args: argparse.Namespace, description: str = "") -> dict[str, Any]:
    """One timed run at ``rate``: vLLM's metrics (plus the per-request detail fields)."""
    cpu_before = time.process_time()
    results, duration = asyncio.run(run_benchmark(target, requests, rate, args.max_concurrency, args.seed,
                                                  args.burstiness, args.ignore_eos, args.disable_tqdm, description))
    client_cpu = time.process_time() - cpu_before
    count_missing_output_tokens(results, tokenizer)
    metrics = compute_metrics(results, duration, parse_percentiles(args.metric_percentiles),
                              parse_metric_list(args.percentile_metrics), parse_goodput(args.goodput))
    # Not a vLLM field: CPU the load generator itself used (it competes with a server on the same machine).
    metrics["client_cpu_s"] = client_cpu
    return metrics


def prepare(args: argparse.Namespace, result_fields: Iterable[str] = ()
            ) -> tuple[Target, TextTokenizer, list[SampleRequest]]:
    """Resolve the server, the tokenizer and the requests, and send the untimed warm-up request.
    ``result_fields``: what the caller's result adds to the header and metrics (no --metadata key may
    reuse a result field)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)   # no log line per request
    percentiles = parse_percentiles(args.metric_percentiles)   # fail on bad flags before any work
    selected = parse_metric_list(args.percentile_metrics)
    goodput = parse_goodput(args.goodput)
    check_result_args(args)
    check_serve_args(args)
    target = resolve_target(args)
    tokenizer = resolve_tokenizer(args, target)
    check_result_args(args, [*result_header(args, target, tokenizer, 0.0), "client_cpu_s", *result_fields,
                             *compute_metrics([], 1.0, percentiles, selected, goodput)])
    requests = build_requests(args, target, tokenizer)
    print(f"{target.url} model {target.model!r}; {len(requests)} {args.dataset_name} requests "
          f"({'token ids' if requests and not isinstance(requests[0].prompt, str) else 'text'}), "
          f"mean {np.mean([r.prompt_len for r in requests]):.0f} prompt / "
          f"{np.mean([r.expected_output_len for r in requests]):.0f} output tokens; tokenizer: {tokenizer.name}")
    if not args.no_warmup:
        result = asyncio.run(warm_up(target, requests[0], args.ignore_eos))
        if not result.success:
            raise ValueError(f"the warm-up request failed: {result.error}")
    return target, tokenizer, requests


def result_header(args: argparse.Namespace, target: Target, tokenizer: TextTokenizer, rate: float) -> dict[str, Any]:
    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": target.backend,
            "base_url": target.base_url, "endpoint": target.endpoint, "model_id": target.model,
            "tokenizer_id": tokenizer.name, "dataset_name": args.dataset_name, "dataset_path": args.dataset_path,
            "num_prompts": args.num_prompts, "request_rate": rate if rate != float("inf") else "inf",
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "ignore_eos": args.ignore_eos,
            "seed": args.seed}


def run_serve_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    target, tokenizer, requests = prepare(args)
    metrics = benchmark_at_rate(target, requests, tokenizer, args.request_rate, args)
    selected = parse_metric_list(args.percentile_metrics)
    print(format_report(metrics, parse_percentiles(args.metric_percentiles), selected))
    failures = [e for e in metrics["errors"] if e]
    if failures:
        print(f"first failure: {failures[0]}")
    if saving(args):
        result = dict(result_header(args, target, tokenizer, args.request_rate), **metrics)
        if not args.save_detailed:
            for name in DETAIL_FIELDS:
                result.pop(name, None)
        name = default_filename(args.label or target.backend, f"{args.request_rate}", args.max_concurrency,
                                target.model, result["date"])
        print(f"result: {save_result(args, result, name)}")
    return metrics
