"""``llmserve bench throughput``: offline throughput on synthetic requests, optionally against HF transformers.

Every figure comes from this process on this machine, in one run, so the ratios are fair even when
the machine's speed drifts between runs. The engine and HF both decode greedily and never stop early
(``ignore_eos`` / ``min_new_tokens``), so they do exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams


@dataclass
class ThroughputResult:
    name: str
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def row(self) -> str:
        return (f"{self.name:<34} {self.num_requests:>5} {self.elapsed_s:>9.2f} {self.requests_per_s:>8.3f} "
                f"{self.output_tokens_per_s:>10.1f} {self.total_tokens_per_s:>10.1f}")


HEADER = f"{'run':<34} {'reqs':>5} {'time (s)':>9} {'req/s':>8} {'out tok/s':>10} {'tot tok/s':>10}"


def synthetic_prompts(num_prompts: int, input_len: int, vocab_size: int, special_ids: set[int],
                      seed: int = 0) -> list[list[int]]:
    """Random token ids (no special tokens), the same for every engine compared."""
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in special_ids]
    return [[rng.choice(allowed) for _ in range(input_len)] for _ in range(num_prompts)]


class _Timed:
    """Wraps a callable and accumulates the wall time spent inside it."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def measure_batch1_decode(llm: LLM, prompt: list[int], output_len: int) -> dict[str, float]:
    """TPOT of one request alone, split into model forward, sampler and everything else (engine overhead)."""
    engine = llm.engine
    runner = engine.runner
    model_fn, logits_fn, sampler_fn = runner.model.forward, runner.model.compute_logits, runner.sampler.forward
    forward, logits, sampler = _Timed(model_fn), _Timed(logits_fn), _Timed(sampler_fn)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    engine.add_request("batch1-warmup", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("batch1", prompt, params)
    engine.step()   # prefill + first token, not part of TPOT
    runner.model.forward, runner.model.compute_logits, runner.sampler.forward = forward, logits, sampler
    steps = 0
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    finally:
        elapsed = time.perf_counter() - start
        del runner.model.forward, runner.model.compute_logits, runner.sampler.forward
    per_step = lambda s: 1000 * s / steps  # noqa: E731
    return {
        "decode_steps": steps,
        "tpot_ms": per_step(elapsed),
        "model_forward_ms": per_step(forward.seconds + logits.seconds),
        "sampler_ms": per_step(sampler.seconds),
        "engine_overhead_ms": per_step(elapsed - forward.seconds - logits.seconds - sampler.seconds),
    }


def run_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> ThroughputResult:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))   # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return ThroughputResult("llmserve (continuous batching)", len(prompts), elapsed,
                            sum(map(len, prompts)), out_tokens)


def run_hf(model: Any, prompts: list[list[int]], output_len: int, batch_size: int, pad_id: int,
           name: str) -> ThroughputResult:
    """HF ``generate`` over static batches (left-padded), greedy, exactly ``output_len`` new tokens each."""
    start = time.perf_counter()
    out_tokens = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                                 min_new_tokens=output_len, pad_token_id=pad_id)
        out_tokens += (out.shape[1] - width) * len(batch)
    return ThroughputResult(name, len(prompts), time.perf_counter() - start, sum(map(len, prompts)), out_tokens)


def run_throughput_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    config = engine_config_from_args(args)
    llm = LLM(**vars(config))
    tokenizer = llm.get_tokenizer()
    prompts = synthetic_prompts(args.num_prompts, args.input_len, llm.engine.vocab_size,
                                set(tokenizer.all_special_ids), seed=config.seed)
    print(f"model {llm.engine.model_path} ({llm.engine.dtype}, {llm.engine.device}, "
          f"{torch.get_num_threads()} threads); {args.num_prompts} requests x {args.input_len} prompt tokens x "
          f"{args.output_len} output tokens")
    results = [run_engine(llm, prompts, args.output_len)]
    batch1 = measure_batch1_decode(llm, prompts[0], args.output_len)
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "func"}}
    if args.compare_hf:
        from transformers import AutoModelForCausalLM

        model_path, dtype = llm.engine.model_path, llm.engine.dtype
        del llm   # free the engine's KV cache before HF runs
        hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = args.hf_batch_size or len(prompts)
        results.append(run_hf(hf, prompts, args.output_len, batch, pad, f"HF transformers static batch {batch}"))
        seq = prompts[:args.hf_sequential_prompts or len(prompts)]
        results.append(run_hf(hf, seq, args.output_len, 1, pad, "HF transformers one at a time"))
    print(HEADER)
    for r in results:
        print(r.row())
    for r in results[1:]:
        print(f"llmserve / {r.name}: {results[0].output_tokens_per_s / r.output_tokens_per_s:.2f}x output tokens/s")
    print(f"batch-1 decode: TPOT {batch1['tpot_ms']:.2f} ms = model forward {batch1['model_forward_ms']:.2f} ms "
          f"+ sampler {batch1['sampler_ms']:.2f} ms + engine overhead {batch1['engine_overhead_ms']:.2f} ms per step")
    report["results"] = [dict(asdict(r), requests_per_s=r.requests_per_s, output_tokens_per_s=r.output_tokens_per_s,
                              total_tokens_per_s=r.total_tokens_per_s) for r in results]
    report["batch1_decode"] = batch1
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report

