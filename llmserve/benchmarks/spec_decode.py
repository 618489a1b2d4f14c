"""``llmserve bench spec-decode``: batch-1 TPOT with speculative decoding against without, on prompts whose
continuation repeats them (a passage, then its first part again: the output that copies the rest is what
code edits, quoting summaries and RAG answers look like to a proposer).

The same prompts run one at a time, greedy, in two engines side by side, one without speculation and one with
``--speculative-config``, stepped in turn (:mod:`llmserve.benchmarks.stepped_in_turn`: each arm's clock holds
only its own steps, and a change of the machine's load falls on both), after a warm-up request each;
``--concurrency`` runs the sweep of :mod:`llmserve.benchmarks.spec_decode_sweep` instead. TPOT per request is
(last token - first token) / (tokens - 1) on the arm's own clock; the mean and median over the requests are
reported, with the speed-up, the acceptance rate and the mean acceptance length. Greedy outputs must be equal
token for token: the run fails if they are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
from typing import Any

from llmserve.benchmarks.datasets import CorpusText, HFTokenizer
from llmserve.benchmarks.stepped_in_turn import SteadyConcurrency, run_in_turn
from llmserve.config import EngineConfig
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams

DEFAULT_NUM_PROMPTS = 8


def repeat_prompts(corpus: CorpusText, num: int, passage_len: int, repeat_len: int, seed: int = 0) -> list[list[int]]:
    """``num`` prompts of a corpus passage of ``passage_len`` tokens followed by its first ``repeat_len``."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        passage = corpus.units_of_length(passage_len, rng)
        prompts.append(passage + corpus.tokenizer.encode("\n\n") + passage[:repeat_len])
    return prompts


def speculation_arms(config: EngineConfig) -> dict[str, LLM]:
    """The two engines compared: ``off`` without speculation, ``on`` with ``config``'s."""
    return {"off": LLM(**vars(dataclasses.replace(config, speculative_config=None))), "on": LLM(**vars(config))}


def run_spec_decode_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    config = engine_config_from_args(args)
    if config.speculative_config is None:
        raise ValueError("bench spec-decode compares against --speculative-config (or --speculative-model "
                         "DRAFT or [ngram], with --num-speculative-tokens k): give one")
    if args.output_len < 2:
        raise ValueError("--output-len must be at least 2 (TPOT is measured after the first token)")
    if args.concurrency is not None:
        from llmserve.benchmarks.spec_decode_sweep import run_spec_decode_sweep

        return run_spec_decode_sweep(args, config)
    if args.workload != "repeat" or args.rounds is not None or args.plot or args.plot_runs:
        raise ValueError("--workload, --rounds, --plot and --plot-runs are for the concurrency sweep: give "
                         "--concurrency too")
    num_prompts = DEFAULT_NUM_PROMPTS if args.num_prompts is None else args.num_prompts
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    engines = speculation_arms(config)
    try:
        prompts = repeat_prompts(CorpusText(HFTokenizer(engines["off"].get_tokenizer())), num_prompts,
                                 args.passage_len, args.repeat_len)
        for llm in engines.values():   # warm-up: the first steps of an engine pay one-off costs
            llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        runs = {arm: SteadyConcurrency(llm, prompts, params, 1) for arm, llm in engines.items()}
        run_in_turn(list(runs.values()))
    finally:
        for llm in engines.values():
            llm.shutdown()
    results: dict[str, Any] = {}
    outputs = {arm: run.token_ids() for arm, run in runs.items()}
    for arm, run in runs.items():
        tpots, stats = run.tpots(), engines[arm].engine.scheduler.spec_stats
        results[arm] = {"mean_tpot_ms": 1000 * statistics.mean(tpots), "median_tpot_ms": 1000 * statistics.median(tpots),
                        "acceptance_rate": stats.acceptance_rate, "mean_acceptance_length": stats.mean_acceptance_length,
                        "num_drafts": stats.num_drafts}
    if outputs["on"] != outputs["off"]:
        raise RuntimeError("greedy outputs differ with speculation on and off")
    on, off = results["on"], results["off"]
    results["speedup_mean_tpot"] = off["mean_tpot_ms"] / on["mean_tpot_ms"]
    print(f"{num_prompts} prompts of {args.passage_len} + {args.repeat_len} tokens, {args.output_len} output "
          f"tokens, batch 1, {config.speculative_config}")
    for name in ("off", "on"):
        r = results[name]
        print(f"speculation {name:>3}: TPOT mean {r['mean_tpot_ms']:.2f} ms, median {r['median_tpot_ms']:.2f} ms")
    print(f"speed-up {results['speedup_mean_tpot']:.2f}x; acceptance rate {on['acceptance_rate']:.1%}, mean "
          f"acceptance length {on['mean_acceptance_length']:.2f} over {on['num_drafts']} drafts")
    save_output_json(args, results)
    return results


def save_output_json(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``--output-json``: the flags and the results, for both the batch-1 comparison and the sweep."""
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "func"}, "results": results}, f, indent=2)
