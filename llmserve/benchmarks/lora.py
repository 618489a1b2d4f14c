"""``llmserve bench lora``: what LoRA costs, as throughput ratios of four configurations.

The same random requests run in four ways: base requests with LoRA off (the reference), base requests with
LoRA on (``--max-loras`` slots, ``--max-lora-rank``), every request with one adapter, and the requests
spread round-robin over ``--max-loras`` adapters. The adapters are ``--lora-path`` folders (cycled when
fewer than ``--max-loras``, each under its own id, as vLLM's benchmark reuses one path) or, without it,
random adapters of rank ``--lora-rank`` over every attention and MLP projection, generated for the model.

The four configurations are four engines in one process, stepped in turn (one engine step each, which goes
first alternating: :mod:`llmserve.benchmarks.stepped_in_turn`), each timed by its own steps and keeping at most
``--max-num-seqs`` requests in flight, as ``generate`` does. A change of the machine's speed falls on all four
alike; run one after another, each in a process of its own, the same configurations moved by about 10% from
round to round, more than the 2% the base-request target allows. ``--rounds`` repeats the run; the ratios are
of the throughput summed over the rounds, and each round's ratios are printed beside them (their spread is the
noise left); each round draws its own requests, so that none finds its prompts in the prefix cache. Each engine
takes its own ``--kv-cache-memory-bytes``. The greedy outputs of base requests are compared between LoRA off and
on, and the number that differ is reported (``base_outputs_differing``; enabling LoRA must leave them alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from llmserve.benchmarks.datasets import HFTokenizer, allowed_token_ids, sample_random
from llmserve.benchmarks.flags import require_at_least, set_flags
from llmserve.benchmarks.profiling import greedy
from llmserve.benchmarks.stepped_in_turn import SteadyConcurrency, run_in_turn
from llmserve.benchmarks.throughput import HEADER, ThroughputResult, load_average
from llmserve.config import EngineConfig
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.lora.request import LoRARequest
from llmserve.model_loader.loader import resolve_model_path
from llmserve.testing.lora_adapters import write_lora_adapter

REFERENCE, LORA_ON_BASE, ONE_ADAPTER, MIXED = ("LoRA off, base requests", "LoRA on, base requests",
                                               "LoRA on, one adapter for all", "LoRA on, adapters mixed")
SCENARIOS = (REFERENCE, LORA_ON_BASE, ONE_ADAPTER, MIXED)


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


def configuration_engines(config: EngineConfig) -> dict[str, LLM]:
    """One engine per configuration: LoRA off for the reference, on for the others (all shut down if one fails)."""
    engines: dict[str, LLM] = {}
    try:
        for name in SCENARIOS:
            engines[name] = LLM(**{**vars(config), "enable_lora": name != REFERENCE})
    except BaseException:
        for llm in engines.values():
            llm.shutdown()
        raise
    return engines


def draw_prompts(args: argparse.Namespace, seed: int, allowed: list[int]) -> list[list[int]]:
    """A draw of the random requests' prompts: each round its own, so that no round finds them in the prefix cache."""
    return [list(r.prompt) for r in sample_random(args.num_prompts, args.input_len, args.output_len, 0.0, seed,
                                                  token_ids=allowed)]


def timed_round(engines: dict[str, LLM], prompts: list[list[int]], output_len: int,
                plans: dict[str, list[LoRARequest | None]], concurrency: int) -> dict[str, SteadyConcurrency]:
    """Every configuration's run of the requests, stepped in turn."""
    runs = {name: SteadyConcurrency(llm, prompts, greedy(output_len), concurrency, plans[name])
            for name, llm in engines.items()}
    run_in_turn(list(runs.values()))
    return runs


def round_result(name: str, run: SteadyConcurrency, prompts: list[list[int]], load: tuple[float | None, ...]
                 ) -> ThroughputResult:
    return ThroughputResult(name, len(prompts), run.seconds, sum(map(len, prompts)),
                            sum(map(len, run.token_ids())), *load)


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any engine loads, counts that cannot work and adapter flags that would do nothing."""
    require_at_least(args, {"rounds": 1, "num_prompts": 1, "input_len": 1, "output_len": 1, "lora_rank": 1})
    if args.lora_path and len(args.lora_path) > args.max_loras:
        raise ValueError(f"--lora-path names {len(args.lora_path)} adapters but --max-loras is {args.max_loras}: the "
                         f"benchmark runs --max-loras adapters; raise --max-loras to {len(args.lora_path)} or name "
                         "fewer")
    if args.lora_path and set_flags(args, ["lora_rank"]):
        raise ValueError("--lora-rank is the rank of the random adapters, which --lora-path replaces: the given "
                         "adapters keep their own rank")


def run_lora_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    config = engine_config_from_args(args)
    rounds: dict[str, list[ThroughputResult]] = {name: [] for name in SCENARIOS}
    differing = 0
    with tempfile.TemporaryDirectory() as workdir:
        adapters = adapter_requests(args, resolve_model_path(config.model, config.revision, config.download_dir),
                                    Path(workdir))
        plans = adapter_plans(adapters, args.num_prompts)
        engines = configuration_engines(config)
        try:
            engine = engines[REFERENCE].engine
            model = f"{engine.model_path} ({engine.dtype}, {engine.device})"
            tokenizer = HFTokenizer(engines[REFERENCE].get_tokenizer())
            allowed = allowed_token_ids(engine.vocab_size, tokenizer.special_ids)
            warm_up = draw_prompts(args, config.seed + args.rounds, allowed)[:len(adapters)]
            for name, llm in engines.items():   # kernels, allocator, adapters read and resident
                llm.generate([{"prompt_token_ids": p} for p in warm_up], greedy(2),
                             lora_request=plans[name][:len(warm_up)], use_tqdm=False)
            for index in range(args.rounds):
                prompts = draw_prompts(args, config.seed + index, allowed)
                before = load_average()
                runs = timed_round(engines, prompts, args.output_len, plans, config.max_num_seqs)
                load = (before, load_average())
                for name, run in runs.items():
                    rounds[name].append(round_result(name, run, prompts, load))
                differing += sum(a != b for a, b in zip(runs[REFERENCE].token_ids(), runs[LORA_ON_BASE].token_ids()))
        finally:
            for llm in engines.values():
                llm.shutdown()
    print(f"model {model}; {args.num_prompts} requests x {args.input_len} in / {args.output_len} out; "
          f"{len(adapters)} adapters, rank {args.lora_rank if not args.lora_path else 'given'}; "
          f"{args.rounds} rounds of the four configurations, stepped in turn")
    print(HEADER)
    for results in zip(*rounds.values()):
        for r in results:
            print(r.row() + ("" if r.load_before is None else f"  load {r.load_before:.2f} / {r.load_after:.2f}"))
    throughput = {name: sum(r.output_tokens for r in results) / sum(r.elapsed_s for r in results)
                  for name, results in rounds.items()}
    ratios = {name: tokens / throughput[REFERENCE] for name, tokens in throughput.items()}
    of_base = {name: throughput[name] / throughput[LORA_ON_BASE] for name in (ONE_ADAPTER, MIXED)}
    per_round = {name: [r.output_tokens_per_s / ref.output_tokens_per_s
                        for r, ref in zip(rounds[name], rounds[LORA_ON_BASE if name in of_base else REFERENCE])]
                 for name in SCENARIOS[1:]}
    for name, ratio in ratios.items():
        versus_base = f", {of_base[name]:.3f}x of LoRA-on base requests" if name in of_base else ""
        rounds_note = (f" (rounds: {', '.join(f'{x:.3f}x' for x in per_round[name])})" if name in per_round else "")
        print(f"{name}: {throughput[name]:.1f} output tok/s, {ratio:.3f}x of LoRA off{versus_base}{rounds_note}")
    print(f"base requests' greedy outputs differing between LoRA off and on: {differing} of "
          f"{args.rounds * args.num_prompts}")
    report = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "model": model,
              "rounds": [[dataclasses.asdict(r) for r in results] for results in rounds.values()],
              "output_tokens_per_s": throughput, "ratios_output_tokens_per_s": ratios,
              "ratios_of_lora_on_base": of_base, "ratios_per_round": per_round,
              "base_outputs_differing": differing}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return report
