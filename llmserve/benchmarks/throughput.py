"""``llmserve bench throughput``: offline throughput, optionally against Hugging Face transformers.

Requests are random token ids of fixed lengths (``--dataset-name random``, ``--input-len`` x
``--output-len``, spread by ``--random-range-ratio``) or ShareGPT-shaped requests of varied lengths
(``--dataset-name sharegpt``: synthetic from the bundled corpus, or a real file via ``--dataset-path``;
see :mod:`llmserve.benchmarks.datasets`).

Every figure comes from this process on this machine, in one run, so the ratios are fair even when the
machine's speed drifts between runs. All runs decode greedily and never stop early (``ignore_eos`` /
``min_new_tokens``), and every request gets its own output length:

* llmserve: every request at once; continuous batching admits and retires them step by step.
* HF static batches (``--hf-batch-size``, in the requests' order, no sorting): each batch is left-padded
  to its longest prompt and generates until its longest output (``max_new_tokens`` = the batch's
  largest output length); only each request's own output tokens are counted. That padding and
  waiting is what static batching costs and continuous batching avoids.
* HF one at a time (the first ``--hf-sequential-prompts`` requests): each exactly its own length.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from llmserve.benchmarks.datasets import (CorpusText, HFTokenizer, SampleRequest, allowed_token_ids, load_sharegpt,
                                          sample_random, sample_sharegpt_synthetic)
from llmserve.benchmarks.flags import flag, refuse_other_datasets_flags, require_at_least
from llmserve.benchmarks.profiling import StepProfiler, greedy, run_to_completion, summarize
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM

DEFAULT_HF_MAX_BATCH = 64
# each dataset's own flags (dests): another dataset's, set, would do nothing
DATASET_FLAGS = {"random": ("input_len", "output_len", "random_range_ratio"),
                 "sharegpt": ("dataset_path", "sharegpt_output_len")}
HF_FLAGS = ("hf_batch_size", "hf_sequential_prompts")   # the Hugging Face runs' flags: need --compare-hf


@dataclass
class ThroughputResult:
    name: str
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int
    load_before: float | None = None   # 1-minute load average of the machine when the run started / ended
    load_after: float | None = None

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
        return (f"{self.name:<38} {self.num_requests:>5} {self.elapsed_s:>9.2f} {self.requests_per_s:>8.3f} "
                f"{self.output_tokens_per_s:>10.1f} {self.total_tokens_per_s:>10.1f}")


HEADER = f"{'run':<38} {'reqs':>5} {'time (s)':>9} {'req/s':>8} {'out tok/s':>10} {'tot tok/s':>10}"


def synthetic_prompts(num_prompts: int, input_len: int, vocab_size: int, special_ids: set[int],
                      seed: int = 0) -> list[list[int]]:
    """Random token ids (no special tokens), the same for every engine compared."""
    rng = random.Random(seed)
    allowed = [t for t in range(vocab_size) if t not in special_ids]
    return [[rng.choice(allowed) for _ in range(input_len)] for _ in range(num_prompts)]


def measure_batch1_decode(llm: LLM, prompt: list[int], output_len: int) -> dict[str, float]:
    """TPOT of one request alone, split into model forward, sampler and everything else (engine overhead)."""
    engine = llm.engine
    engine.add_request("batch1-warmup", prompt, greedy(4))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("batch1", prompt, greedy(output_len))
    if engine.config.executor_backend != "uni":
        # The model runs in worker processes: only the step's wall time can be seen from here.
        walls = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
        return {"decode_steps": len(walls) - 1, "tpot_ms": 1e3 * sum(walls[1:]) / max(1, len(walls) - 1)}
    with StepProfiler(engine) as profiler:
        records = run_to_completion(engine, profiler)
    stats = summarize(records[1:])   # the first step is the prefill + first token, not part of TPOT
    return {"decode_steps": stats["steps"], "tpot_ms": stats["step_ms"], "model_forward_ms": stats["model_forward_ms"],
            "sampler_ms": stats["sampler_ms"], "engine_overhead_ms": stats["engine_overhead_ms"]}


def make_requests(args: argparse.Namespace, llm: LLM) -> list[SampleRequest]:
    """Token-id requests for the dataset the flags name (the same requests for every run compared)."""
    tokenizer = HFTokenizer(llm.get_tokenizer())
    seed = llm.engine.config.seed
    name = getattr(args, "dataset_name", "random")
    if name == "random":
        ids = allowed_token_ids(llm.engine.vocab_size, tokenizer.special_ids)
        return sample_random(args.num_prompts, args.input_len, args.output_len,
                             getattr(args, "random_range_ratio", 0.0), seed, token_ids=ids)
    max_total = llm.engine.max_model_len
    if getattr(args, "dataset_path", None):
        return load_sharegpt(args.dataset_path, args.num_prompts, tokenizer, seed, args.sharegpt_output_len,
                             max_total, as_token_ids=True)
    return sample_sharegpt_synthetic(args.num_prompts, CorpusText(tokenizer), seed, max_total,
                                     getattr(args, "sharegpt_output_len", None), as_token_ids=True)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def with_load(run: Any, *args: Any) -> ThroughputResult:
    """``run(*args)`` with the machine's load average noted before and after (a busy shared machine shows)."""
    before = load_average()
    result = run(*args)
    result.load_before, result.load_after = before, load_average()
    return result


def run_engine(llm: LLM, requests: list[SampleRequest]) -> ThroughputResult:
    llm.generate([requests[0].prompt], greedy(2), use_tqdm=False)   # warm-up
    prompts = [{"prompt_token_ids": r.prompt} for r in requests]
    params = [greedy(r.expected_output_len) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return ThroughputResult("llmserve (continuous batching)", len(requests), elapsed,
                            sum(r.prompt_len for r in requests), out_tokens)


def run_hf(model: Any, requests: list[SampleRequest], batch_size: int, pad_id: int, name: str) -> ThroughputResult:
    """HF ``generate`` over static batches (left-padded to the longest prompt), greedy, each batch running
    until its longest output; each request counts only its own output tokens."""
    start = time.perf_counter()
    out_tokens = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt) for r in batch)
        new_tokens = max(r.expected_output_len for r in batch)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + list(r.prompt) for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=pad_id)
        generated = out.shape[1] - width
        out_tokens += sum(min(r.expected_output_len, generated) for r in batch)
    return ThroughputResult(name, len(requests), time.perf_counter() - start,
                            sum(r.prompt_len for r in requests), out_tokens)


def describe(requests: list[SampleRequest]) -> dict[str, float]:
    ins = [r.prompt_len for r in requests]
    outs = [r.expected_output_len for r in requests]
    return {"num_requests": len(requests), "prompt_tokens": sum(ins), "output_tokens": sum(outs),
            "mean_prompt_len": sum(ins) / len(ins), "max_prompt_len": max(ins),
            "mean_output_len": sum(outs) / len(outs), "max_output_len": max(outs)}


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before the engine loads, counts and lengths that cannot work and flags that would do nothing."""
    require_at_least(args, {"num_prompts": 1, "input_len": 1, "output_len": 1, "sharegpt_output_len": 1,
                            "hf_batch_size": 1, "hf_sequential_prompts": 1})
    refuse_other_datasets_flags(args, DATASET_FLAGS)
    if not args.compare_hf:
        for dest in HF_FLAGS:
            if getattr(args, dest) is not None:
                raise ValueError(f"{flag(dest)} sets up the Hugging Face runs: it does nothing without --compare-hf")


def run_throughput_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    config = engine_config_from_args(args)
    llm = LLM(**vars(config))
    tokenizer = llm.get_tokenizer()
    requests = make_requests(args, llm)
    shape = describe(requests)
    dataset = getattr(args, "dataset_name", "random")
    print(f"model {llm.engine.model_path} ({llm.engine.dtype}, {llm.engine.device}, "
          f"{torch.get_num_threads()} threads); {len(requests)} {dataset} requests: prompt mean "
          f"{shape['mean_prompt_len']:.0f} (max {shape['max_prompt_len']}) tokens, output mean "
          f"{shape['mean_output_len']:.0f} (max {shape['max_output_len']}) tokens")
    results = [with_load(run_engine, llm, requests)]
    batch1 = measure_batch1_decode(llm, list(requests[0].prompt), max(requests[0].expected_output_len, 2))
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "dataset": shape}
    if args.compare_hf:
        from transformers import AutoModelForCausalLM

        model_path, dtype = llm.engine.model_path, llm.engine.dtype
        del llm   # free the engine's KV cache before HF runs
        hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = args.hf_batch_size or min(len(requests), DEFAULT_HF_MAX_BATCH)
        results.append(with_load(run_hf, hf, requests, batch, pad, f"HF transformers static batch {batch}"))
        seq = requests[:args.hf_sequential_prompts or len(requests)]
        results.append(with_load(run_hf, hf, seq, 1, pad, "HF transformers one at a time"))
    print(HEADER)
    for r in results:
        print(r.row())
    ratios = {}
    for r in results[1:]:
        ratios[r.name] = results[0].output_tokens_per_s / r.output_tokens_per_s
        print(f"llmserve / {r.name}: {ratios[r.name]:.2f}x output tokens/s")
    if results[0].load_before is not None:
        print("machine load (1-min average) at the start / end of each run: " + "; ".join(
            f"{r.name} {r.load_before:.2f} / {r.load_after:.2f}" for r in results))
    if "model_forward_ms" in batch1:
        print(f"batch-1 decode: TPOT {batch1['tpot_ms']:.2f} ms = model forward {batch1['model_forward_ms']:.2f} ms "
              f"+ sampler {batch1['sampler_ms']:.2f} ms + engine overhead {batch1['engine_overhead_ms']:.2f} ms per step")
    else:
        print(f"batch-1 decode: TPOT {batch1['tpot_ms']:.2f} ms (worker processes: no breakdown)")
    report["results"] = [dict(asdict(r), requests_per_s=r.requests_per_s, output_tokens_per_s=r.output_tokens_per_s,
                              total_tokens_per_s=r.total_tokens_per_s) for r in results]
    report["speedup_output_tokens_per_s"] = ratios
    report["batch1_decode"] = batch1
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report
