"""``llmserve bench lora``: what LoRA costs, as ratios measured in one process.

Two engines on the same model, LoRA off and on (``--max-loras`` slots, ``--max-lora-rank``), run the
same random requests in four ways: base requests with LoRA off (the reference), base requests with
LoRA on, every request with one adapter, and the requests spread round-robin over ``--max-loras``
adapters. The adapters are ``--lora-path`` folders (cycled when fewer than ``--max-loras``, each under its
own id, as vLLM's benchmark reuses one path) or, without it, random adapters of rank ``--lora-rank`` over
every attention and MLP projection, generated for the model. The four runs repeat ``--rounds`` times,
interleaved, so a machine whose speed drifts slows each of them alike; the best round of each counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from llmserve.benchmarks.datasets import HFTokenizer, allowed_token_ids, sample_random
from llmserve.benchmarks.profiling import greedy
from llmserve.benchmarks.throughput import HEADER, ThroughputResult, load_average
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.lora.request import LoRARequest
from llmserve.testing.lora_adapters import write_lora_adapter

SCENARIOS = ("LoRA off, base requests", "LoRA on, base requests", "LoRA on, one adapter for all",
             "LoRA on, adapters mixed")


def adapter_requests(args: argparse.Namespace, model_path: Path, workdir: Path) -> list[LoRARequest]:
    """``--max-loras`` adapters: the given folders, or random ones of rank ``--lora-rank``."""
    count = args.max_loras
    paths = [Path(p) for p in args.lora_path] if args.lora_path else [
        write_lora_adapter(workdir / f"rank{args.lora_rank}-{i}", model_path, r=args.lora_rank,
                           lora_alpha=2 * args.lora_rank, seed=i, std=0.02) for i in range(count)]
    return [LoRARequest(f"lora-{i + 1}", i + 1, str(paths[i % len(paths)])) for i in range(count)]


def run_once(llm: LLM, prompts: list[list[int]], output_len: int, loras: list[LoRARequest | None],
             name: str) -> ThroughputResult:
    before = load_average()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(output_len), lora_request=loras)
    elapsed = time.perf_counter() - start
    result = ThroughputResult(name, len(prompts), elapsed, sum(map(len, prompts)),
                              sum(len(c.token_ids) for o in outputs for c in o.outputs))
    result.load_before, result.load_after = before, load_average()
    return result


def run_lora_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    config = engine_config_from_args(args)
    off = LLM(**{**vars(config), "enable_lora": False})
    on = LLM(**{**vars(config), "enable_lora": True})
    engine = off.engine
    tokenizer = HFTokenizer(off.get_tokenizer())
    requests = sample_random(args.num_prompts, args.input_len, args.output_len, 0.0, config.seed,
                             token_ids=allowed_token_ids(engine.vocab_size, tokenizer.special_ids))
    prompts = [list(r.prompt) for r in requests]
    with tempfile.TemporaryDirectory() as workdir:
        adapters = adapter_requests(args, Path(engine.model_path), Path(workdir))
        n = len(prompts)
        plans = [(off, [None] * n), (on, [None] * n), (on, [adapters[0]] * n),
                 (on, [adapters[i % len(adapters)] for i in range(n)])]
        for llm, loras in plans:   # warm-up: kernels, allocator, adapters read and resident
            run_once(llm, prompts[:len(adapters)], 2, loras[:len(adapters)], "warm-up")
        rounds: list[list[ThroughputResult]] = [[] for _ in SCENARIOS]
        for _ in range(args.rounds):
            for runs, name, (llm, loras) in zip(rounds, SCENARIOS, plans):
                runs.append(run_once(llm, prompts, args.output_len, loras, name))
    best = [max(runs, key=lambda r: r.output_tokens_per_s) for runs in rounds]
    print(f"model {engine.model_path} ({engine.dtype}, {engine.device}); {n} requests x {args.input_len} in / "
          f"{args.output_len} out; {len(adapters)} adapters, rank {args.lora_rank if not args.lora_path else 'given'}"
          f"; best of {args.rounds} interleaved rounds")
    print(HEADER)
    for r in best:
        print(r.row())
    reference = best[0].output_tokens_per_s
    ratios = {r.name: r.output_tokens_per_s / reference for r in best}
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.3f}x of LoRA off")
    report = {"config": {k: v for k, v in vars(args).items() if k != "func"},
              "rounds": [[dataclasses.asdict(r) for r in runs] for runs in rounds],
              "ratios_output_tokens_per_s": ratios}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    off.shutdown()
    on.shutdown()
    return report
