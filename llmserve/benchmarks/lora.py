"""``llmserve bench lora``: what LoRA costs, as throughput ratios of four configurations.

The same random requests run in four ways: base requests with LoRA off (the reference), base requests with
LoRA on (``--max-loras`` slots, ``--max-lora-rank``), every request with one adapter, and the requests
spread round-robin over ``--max-loras`` adapters. The adapters are ``--lora-path`` folders (cycled when
fewer than ``--max-loras``, each under its own id, as vLLM's benchmark reuses one path) or, without it,
random adapters of rank ``--lora-rank`` over every attention and MLP projection, generated for the model.

Each configuration runs in a process of its own (engine built, warmed up, timed, process gone), so no
configuration shares threads, caches or an allocator with another; two engines in one process slowed
each other unevenly. The four run back to back and the round repeats ``--rounds`` times, so a machine
whose speed drifts slows each of them alike; the ratios are of the mean throughput over the rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from llmserve.benchmarks.datasets import HFTokenizer, allowed_token_ids, sample_random
from llmserve.benchmarks.profiling import greedy
from llmserve.benchmarks.throughput import HEADER, ThroughputResult, with_load
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.logging_setup import LogSetup, configure_logging, current_setup
from llmserve.lora.request import LoRARequest
from llmserve.model_loader.loader import resolve_model_path
from llmserve.testing.lora_adapters import write_lora_adapter

REFERENCE, LORA_ON_BASE, ONE_ADAPTER, MIXED = ("LoRA off, base requests", "LoRA on, base requests",
                                               "LoRA on, one adapter for all", "LoRA on, adapters mixed")
SCENARIOS = (REFERENCE, LORA_ON_BASE, ONE_ADAPTER, MIXED)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every configuration runs: the random requests (drawn alike in each process from the seed)."""

    num_prompts: int
    input_len: int
    output_len: int
    seed: int


@dataclasses.dataclass
class ConfigurationRun:
    """One timed run of a configuration, and the process and model that ran it."""

    result: ThroughputResult
    pid: int
    model: str


def adapter_requests(args: argparse.Namespace, model_path: Path, workdir: Path) -> list[LoRARequest]:
    """``--max-loras`` adapters: the given folders, or random ones of rank ``--lora-rank``."""
    count = args.max_loras
    paths = [Path(p) for p in args.lora_path] if args.lora_path else [
        write_lora_adapter(workdir / f"rank{args.lora_rank}-{i}", model_path, r=args.lora_rank,
                           lora_alpha=2 * args.lora_rank, seed=i, std=0.02) for i in range(count)]
    return [LoRARequest(f"lora-{i + 1}", i + 1, str(paths[i % len(paths)])) for i in range(count)]


def adapter_plans(adapters: list[LoRARequest], n: int) -> dict[str, list[LoRARequest | None]]:
    """Each configuration's adapter per request."""
    return {REFERENCE: [None] * n, LORA_ON_BASE: [None] * n, ONE_ADAPTER: [adapters[0]] * n,
            MIXED: [adapters[i % len(adapters)] for i in range(n)]}


def generate(llm: LLM, prompts: list[list[int]], output_len: int, loras: list[LoRARequest | None],
             name: str) -> ThroughputResult:
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(output_len), lora_request=loras)
    elapsed = time.perf_counter() - start
    return ThroughputResult(name, len(prompts), elapsed, sum(map(len, prompts)),
                            sum(len(c.token_ids) for o in outputs for c in o.outputs))


def run_configuration(engine_kwargs: dict[str, Any], name: str, workload: Workload,
                      loras: list[LoRARequest | None], num_warmup: int, log: LogSetup) -> ConfigurationRun:
    """One configuration, in the process that runs it: the engine, a short warm-up (kernels, allocator,
    adapters read and resident), the timed run."""
    configure_logging(log, "bench")
    llm = LLM(**{**engine_kwargs, "enable_lora": name != REFERENCE})
    try:
        engine = llm.engine
        tokenizer = HFTokenizer(llm.get_tokenizer())
        requests = sample_random(workload.num_prompts, workload.input_len, workload.output_len, 0.0, workload.seed,
                                 token_ids=allowed_token_ids(engine.vocab_size, tokenizer.special_ids))
        prompts = [list(r.prompt) for r in requests]
        generate(llm, prompts[:num_warmup], 2, loras[:num_warmup], "warm-up")
        result = with_load(generate, llm, prompts, workload.output_len, loras, name)
        return ConfigurationRun(result, os.getpid(), f"{engine.model_path} ({engine.dtype}, {engine.device})")
    finally:
        llm.shutdown()


def in_own_process(*args: Any) -> ConfigurationRun:
    """:func:`run_configuration` in a fresh (spawned) process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_configuration, *args).result()


def mean_tokens_per_s(runs: list[ConfigurationRun]) -> float:
    return sum(r.result.output_tokens_per_s for r in runs) / len(runs)


def run_lora_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    config = engine_config_from_args(args)
    engine_kwargs = vars(config)
    workload = Workload(args.num_prompts, args.input_len, args.output_len, config.seed)
    rounds: dict[str, list[ConfigurationRun]] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory() as workdir:
        adapters = adapter_requests(args, resolve_model_path(config.model, config.revision, config.download_dir),
                                    Path(workdir))
        plans = adapter_plans(adapters, args.num_prompts)
        for _ in range(args.rounds):
            for name in SCENARIOS:
                rounds[name].append(in_own_process(engine_kwargs, name, workload, plans[name], len(adapters),
                                                   current_setup()))
    print(f"model {rounds[REFERENCE][0].model}; {args.num_prompts} requests x {args.input_len} in / "
          f"{args.output_len} out; "
          f"{len(adapters)} adapters, rank {args.lora_rank if not args.lora_path else 'given'}; "
          f"{args.rounds} rounds of the four configurations, each in its own process")
    print(HEADER)
    for runs in zip(*rounds.values()):
        for run in runs:
            r = run.result
            load = "" if r.load_before is None else f"  load {r.load_before:.2f} / {r.load_after:.2f}"
            print(r.row() + load)
    means = {name: mean_tokens_per_s(runs) for name, runs in rounds.items()}
    ratios = {name: tokens / means[REFERENCE] for name, tokens in means.items()}
    of_base = {name: means[name] / means[LORA_ON_BASE] for name in (ONE_ADAPTER, MIXED)}
    for name, ratio in ratios.items():
        versus_base = f", {of_base[name]:.3f}x of LoRA-on base requests" if name in of_base else ""
        print(f"{name}: {means[name]:.1f} output tok/s (mean), {ratio:.3f}x of LoRA off{versus_base}")
    report = {"config": {k: v for k, v in vars(args).items() if k != "func"},
              "rounds": [[{**dataclasses.asdict(run.result), "pid": run.pid} for run in runs]
                         for runs in rounds.values()],
              "mean_output_tokens_per_s": means, "ratios_output_tokens_per_s": ratios,
              "ratios_of_lora_on_base": of_base}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return report
