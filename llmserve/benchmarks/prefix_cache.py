"""``llmserve bench prefix-cache``: what prefix caching and block sharing buy, measured in one run.

1. TTFT of requests that share a long prefix (a system prompt) with caching on and off: requests run
   one at a time after one warm-up request, so TTFT is the prefill cost alone, not queueing.
2. Memory for ``n`` parallel samples: KV blocks in use right after the prompt is computed, against
   ``n`` private copies.
3. KV waste at steady state: slots allocated but not filled, over slots allocated, sampled every step
   while a batch of requests with varied lengths runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams


def mean_ttft(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    """Mean time to first token of ``prompts`` run one at a time (the first is a warm-up, not counted)."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ttfts = []
    for i, prompt in enumerate(prompts):
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        if i:
            ttfts.append(out.metrics.time_to_first_token)
    return statistics.mean(ttfts)


def parallel_sample_blocks(llm: LLM, prompt: list[int], n: int) -> tuple[int, int]:
    """(blocks in use after the prompt step with sharing, blocks n private copies would need)."""
    engine = llm.engine
    engine.add_request("fork-probe", prompt, SamplingParams(n=n, temperature=1.0, max_tokens=4, seed=0))
    engine.step()
    while engine.scheduler.waiting:   # a prompt longer than one step's budget takes several
        engine.step()
    used = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    engine.abort_request("fork-probe")
    return used, n * engine.block_manager.blocks_for(len(prompt))


def steady_state_waste(llm: LLM, rng: random.Random, vocab: int, num_requests: int) -> float:
    """Mean KV waste over every step of a batch with log-normal prompt/output lengths (ShareGPT-like)."""
    engine = llm.engine
    for i in range(num_requests):
        prompt_len = min(1024, max(4, int(rng.lognormvariate(5.0, 0.9))))
        output_len = min(512, max(4, int(rng.lognormvariate(5.2, 0.8))))
        engine.add_request(f"waste-{i}", [rng.randrange(100, vocab) for _ in range(prompt_len)],
                           SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    samples = []
    while engine.has_unfinished_requests():
        engine.step()
        if engine.scheduler.running:
            samples.append(engine.kv_cache_waste())
    return statistics.mean(samples)


def run_prefix_cache_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if not args.enable_prefix_caching:
        raise ValueError("--no-enable-prefix-caching: bench prefix-cache runs with prefix caching on and off itself")
    rng = random.Random(args.seed)
    results: dict[str, Any] = {}
    for caching in (True, False):
        config = engine_config_from_args(args)
        config.enable_prefix_caching = caching
        llm = LLM(**vars(config))
        vocab = llm.engine.vocab_size
        if not results:
            prefix = [rng.randrange(100, vocab) for _ in range(args.prefix_len)]
            prompts = [prefix + [rng.randrange(100, vocab) for _ in range(args.suffix_len)]
                       for _ in range(args.num_prompts + 1)]
        key = "on" if caching else "off"
        results[f"mean_ttft_ms_caching_{key}"] = 1000 * mean_ttft(llm, prompts, args.output_len)
        if caching:
            used, private = parallel_sample_blocks(llm, prompts[0], args.n)
            results.update(parallel_blocks_used=used, parallel_blocks_private=private)
            results["kv_waste_steady_state"] = steady_state_waste(llm, rng, vocab, args.waste_requests)
        del llm
    results["ttft_speedup"] = results["mean_ttft_ms_caching_off"] / results["mean_ttft_ms_caching_on"]
    print(f"shared prefix {args.prefix_len} tokens + {args.suffix_len}-token suffixes, {args.num_prompts} requests "
          f"one at a time (after one warm-up)")
    print(f"mean TTFT: caching on {results['mean_ttft_ms_caching_on']:.1f} ms, off "
          f"{results['mean_ttft_ms_caching_off']:.1f} ms -> {results['ttft_speedup']:.1f}x lower")
    print(f"n={args.n} parallel samples of a {args.prefix_len + args.suffix_len}-token prompt: "
          f"{results['parallel_blocks_used']} KV blocks in use vs {results['parallel_blocks_private']} for private "
          f"copies ({1 - results['parallel_blocks_used'] / results['parallel_blocks_private']:.0%} saved)")
    print(f"KV waste at steady state ({args.waste_requests} log-normal-length requests): "
          f"{100 * results['kv_waste_steady_state']:.2f}% of allocated slots")
    return results
