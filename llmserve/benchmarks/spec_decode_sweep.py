"""``llmserve bench spec-decode --concurrency 1,8,32,64``: speculation on against off at several numbers of
concurrent requests, the check behind the rule "with speculation configured, throughput and TPOT are never
worse than with it off".

Two engines live side by side in this process, one without speculation and one with ``--speculative-config``,
and run in turn, one engine step each (:mod:`llmserve.benchmarks.stepped_in_turn`): each arm's time is the sum
of its own steps (its throughput's and its TPOTs' clock). At concurrency ``c`` an arm generates ``--num-prompts`` prompts (default ``4 c``;
greedy, ``--output-len`` tokens each, EOS ignored), the same prompts for both arms, at most ``c`` at a time: a
finished request is replaced by the next at once, as a serving benchmark's ``--max-concurrency`` keeps them.
(``c`` prompts run as one closed batch would time its slowest request: under adaptive speculation the
sequences whose drafts are accepted finish early while the others pay for longer steps, so the batch's wall
time can grow while every step yields more tokens.) Per concurrency the report gives,
summed over the rounds, each arm's output throughput (output tokens / wall time) and mean TPOT, and the on/off
ratios as speeds: throughput on / off and TPOT off / on, so that a ratio below 1 means speculation cost time;
the ratios of each round are given too, their spread being the noise of the machine.

``--workload repeat`` is the batch-1 benchmark's (a corpus passage, then its beginning again: prompt lookup
finds matches); ``--workload random`` draws random token ids of the same length (nothing to look up, so
drafts are rarely proposed and rarely accepted: what speculation costs where it cannot help). Greedy
outputs are compared and the number that differ is reported, not treated as a failure: in bfloat16, a step
verifying drafts computes a row's logits in another batch shape than a plain decode step, so a near tie can
round the other way.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
from pathlib import Path
from typing import Any

from llmserve.benchmarks.datasets import CorpusText, HFTokenizer, allowed_token_ids, random_token_ids
from llmserve.benchmarks.plotting import require_matplotlib
from llmserve.benchmarks.spec_decode import repeat_prompts, save_output_json, speculation_arms
from llmserve.benchmarks.spec_decode_plot import load_sweep, plot_speedups, sweep_label
from llmserve.benchmarks.stepped_in_turn import SteadyConcurrency, run_in_turn
from llmserve.config import EngineConfig
from llmserve.entrypoints.llm import LLM
from llmserve.sampling_params import SamplingParams

WORKLOADS = ("repeat", "random")
DEFAULT_ROUNDS = 2
DEFAULT_REQUESTS_PER_SLOT = 4   # requests per unit of concurrency when --num-prompts is not given


def parse_concurrency(value: str) -> list[int]:
    """``1,8,32,64`` -> [1, 8, 32, 64]; every entry an integer >= 1."""
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated integers, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency must be integers >= 1, got {value!r}")
    return levels


def sweep_prompts(llm: LLM, workload: str, num: int, passage_len: int, repeat_len: int) -> list[list[int]]:
    """``num`` prompts of ``passage_len + repeat_len`` tokens (plus the separator for ``repeat``)."""
    tokenizer = HFTokenizer(llm.get_tokenizer())
    if workload == "repeat":
        return repeat_prompts(CorpusText(tokenizer), num, passage_len, repeat_len)
    allowed = allowed_token_ids(tokenizer.vocab_size, tokenizer.special_ids)
    rng = random.Random(0)
    return [random_token_ids(rng, passage_len + repeat_len, allowed) for _ in range(num)]


@dataclasses.dataclass
class ArmTotals:
    """One arm at one concurrency, summed over the rounds."""

    output_tokens: int = 0
    seconds: float = 0.0
    tpots: list[float] = dataclasses.field(default_factory=list)
    outputs: list[list[int]] = dataclasses.field(default_factory=list)   # the last round's
    per_round: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def add(self, run: SteadyConcurrency) -> None:
        """A finished run (one round)."""
        tokens = [len(r.outputs[0].token_ids) for r in run.results]
        tpots = run.tpots()
        self.output_tokens += sum(tokens)
        self.seconds += run.seconds
        self.tpots += tpots
        self.outputs = run.token_ids()
        self.per_round.append({"output_throughput": sum(tokens) / run.seconds,
                               "mean_tpot_ms": 1000 * statistics.mean(tpots)})

    def summary(self) -> dict[str, float]:
        return {"output_throughput": self.output_tokens / self.seconds,
                "mean_tpot_ms": 1000 * statistics.mean(self.tpots)}


def run_spec_decode_sweep(args: argparse.Namespace, config: EngineConfig) -> dict[str, Any]:
    levels = parse_concurrency(args.concurrency)
    if args.workload not in WORKLOADS:
        raise ValueError(f"--workload must be one of {', '.join(WORKLOADS)}, got {args.workload!r}")
    rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    if max(levels) > config.max_num_seqs:
        raise ValueError(f"--concurrency {max(levels)} is above --max-num-seqs {config.max_num_seqs}: the engine "
                         f"would queue requests instead of running them at once")
    requests = {c: DEFAULT_REQUESTS_PER_SLOT * c if args.num_prompts is None else args.num_prompts for c in levels}
    if any(n < c for c, n in requests.items()):
        raise ValueError(f"--num-prompts {args.num_prompts} is below --concurrency {max(levels)}: that level would "
                         f"never have as many requests at once")
    if args.plot_runs and not args.plot:
        raise ValueError("--plot-runs adds earlier sweeps to the figure of --plot: give --plot PNG too")
    earlier = [load_sweep(path) for path in args.plot_runs or []]
    if args.plot:
        require_matplotlib("bench spec-decode --plot")
    engines = speculation_arms(config)
    try:
        prompts = sweep_prompts(engines["off"], args.workload, max(requests.values()), args.passage_len,
                                args.repeat_len)
        for llm in engines.values():   # warm-up: the first steps of an engine pay one-off costs
            llm.generate(prompts[:max(levels)], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        totals = {(c, arm): ArmTotals() for c in levels for arm in engines}
        differing = dict.fromkeys(levels, 0)
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        for _ in range(rounds):
            for c in levels:
                runs = {arm: SteadyConcurrency(llm, prompts[:requests[c]], params, c) for arm, llm in engines.items()}
                run_in_turn(list(runs.values()))
                for arm, run in runs.items():
                    totals[c, arm].add(run)
                differing[c] += sum(a != b for a, b in zip(totals[c, "off"].outputs, totals[c, "on"].outputs))
        stats = engines["on"].engine.scheduler.spec_stats
    finally:
        for llm in engines.values():
            llm.shutdown()
    points = []
    for c in levels:
        off, on = totals[c, "off"].summary(), totals[c, "on"].summary()
        points.append({"concurrency": c, "num_requests": requests[c], "off": off, "on": on,
                       "throughput_ratio": on["output_throughput"] / off["output_throughput"],
                       "tpot_ratio": off["mean_tpot_ms"] / on["mean_tpot_ms"],
                       "differing_outputs": differing[c],
                       # the spread of these is the noise the summed ratios carry
                       "throughput_ratio_per_round": [b["output_throughput"] / a["output_throughput"] for a, b in
                                                      zip(totals[c, "off"].per_round, totals[c, "on"].per_round)],
                       "tpot_ratio_per_round": [a["mean_tpot_ms"] / b["mean_tpot_ms"] for a, b in
                                                zip(totals[c, "off"].per_round, totals[c, "on"].per_round)]})
    results = {"label": sweep_label(config.speculative_config, args.workload), "workload": args.workload,
               "rounds": rounds, "points": points,
               "acceptance_rate": stats.acceptance_rate, "mean_acceptance_length": stats.mean_acceptance_length,
               "num_drafts": stats.num_drafts}
    print(f"{args.workload} prompts of {args.passage_len} + {args.repeat_len} tokens, {args.output_len} output tokens, "
          f"{', '.join(f'{n} requests at concurrency {c}' for c, n in requests.items())}, {rounds} rounds, "
          f"{config.speculative_config}")
    print("concurrency | tok/s off | tok/s on | throughput on/off | TPOT off ms | TPOT on ms | TPOT off/on | "
          "outputs differing")
    for p in points:
        print(f"{p['concurrency']:>11} | {p['off']['output_throughput']:9.1f} | {p['on']['output_throughput']:8.1f} | "
              f"{p['throughput_ratio']:17.3f} | {p['off']['mean_tpot_ms']:11.2f} | {p['on']['mean_tpot_ms']:10.2f} | "
              f"{p['tpot_ratio']:11.3f} | {p['differing_outputs']}")
        print(f"{'':>11}   per round: throughput on/off "
              f"{', '.join(f'{r:.3f}' for r in p['throughput_ratio_per_round'])}; TPOT off/on "
              f"{', '.join(f'{r:.3f}' for r in p['tpot_ratio_per_round'])}")
    print(f"acceptance rate {stats.acceptance_rate:.1%}, mean acceptance length {stats.mean_acceptance_length:.2f} "
          f"over {stats.num_drafts} drafts")
    save_output_json(args, results)
    if args.plot:
        plot_speedups(earlier + [results], args.plot, f"speculation on against off, {Path(config.model).name}, "
                      f"{args.output_len} output tokens, {rounds} rounds per level")
    return results
