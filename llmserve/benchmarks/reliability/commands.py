"""The ``llmserve bench soak|abort-storm|overload`` subcommands (argparse only: ``llmserve --help`` imports
nothing heavy; each check's module is imported when it runs)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any


def _range(value: str) -> tuple[int, int]:
    low, _, high = value.partition(":")
    bounds = (int(low), int(high or low))
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return bounds


def add_target_args(parser: argparse.ArgumentParser, prompt_len: str = "8:64", output_len: str = "8:64") -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server under test")
    parser.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="the server's process id: its memory (with its children's) is measured")
    parser.add_argument("--vocab-size", type=int, default=1000, help="prompt token ids are drawn below this")
    parser.add_argument("--prompt-len", type=_range, default=_range(prompt_len), help="MIN:MAX prompt tokens")
    parser.add_argument("--output-len", type=_range, default=_range(output_len), help="MIN:MAX output tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None, help="also write the report to this file")


def _runner(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """The CLI entry of a check (imported only when it runs)."""

    def run(args: argparse.Namespace) -> int:
        import asyncio
        import importlib
        import logging

        logging.getLogger("httpx").setLevel(logging.WARNING)   # no log line per request

        from llmserve.benchmarks.reliability.check_run import finish, resolve_check_target

        check: Callable[[argparse.Namespace, Any], Awaitable[dict[str, Any]]] = getattr(
            importlib.import_module(f"llmserve.benchmarks.reliability.{module}"), function)
        return finish(asyncio.run(check(args, resolve_check_target(args))), args)

    return run


def add_reliability_commands(bench_sub: Any) -> None:
    soak = bench_sub.add_parser("soak", help="many streaming clients for a long time, random disconnects: "
                                             "no failure, no block held after the drain, bounded memory growth")
    add_target_args(soak)
    soak.add_argument("--clients", type=int, default=1000, help="concurrent streaming clients")
    soak.add_argument("--duration", type=float, default=600, help="seconds of load")
    soak.add_argument("--ramp-up", type=float, default=5, help="seconds over which the clients start")
    soak.add_argument("--disconnect-probability", type=float, default=0.1,
                      help="share of requests the client drops after a random number of chunks")
    soak.add_argument("--warmup-fraction", type=float, default=0.2,
                      help="memory growth is measured from this share of the duration to after the drain")
    soak.add_argument("--max-rss-growth", type=float, default=0.05, help="largest allowed memory growth (0.05: 5%%)")
    soak.add_argument("--drain-timeout", type=float, default=60, help="seconds the server gets to go idle")
    soak.set_defaults(func=_runner("soak", "run_soak"))

    storm = bench_sub.add_parser("abort-storm", help="concurrent streams all cancelled at random points: "
                                                     "blocks freed at once, one log line per abort, no traceback")
    add_target_args(storm)
    storm.add_argument("--requests", type=int, default=100)
    storm.add_argument("--max-cancel-chunks", type=int, default=32, help="a client hangs up after 0..N chunks")
    storm.add_argument("--max-abort-steps", type=int, default=1,
                       help="engine steps an abort may wait in the engine core before its blocks are free "
                            "(1: the step in flight when it came)")
    storm.add_argument("--server-log", default=None, help="the server's log file, to check its abort lines")
    storm.add_argument("--log-settle", type=float, default=1.0, help="seconds to wait before reading the log")
    storm.add_argument("--drain-timeout", type=float, default=30)
    storm.set_defaults(func=_runner("abort_storm", "run_abort_storm"))

    over = bench_sub.add_parser("overload", help="offered load above capacity against --max-num-queued-reqs: "
                                                 "503 + Retry-After for the excess, bounded latency, recovery")
    add_target_args(over, output_len="16:16")
    over.add_argument("--max-num-queued-reqs", type=int, required=True,
                      help="the server's --max-num-queued-reqs (bounds an admitted request's wait)")
    over.add_argument("--concurrency", type=int, default=8,
                      help="clients of the capacity phase (the server's --max-num-seqs)")
    over.add_argument("--capacity-seconds", type=float, default=20)
    over.add_argument("--overload-factor", type=float, default=3.0)
    over.add_argument("--overload-seconds", type=float, default=30)
    over.add_argument("--recovery-factor", type=float, default=0.5)
    over.add_argument("--recovery-seconds", type=float, default=20)
    over.add_argument("--latency-slack", type=float, default=2.0, help="factor on the latency bounds")
    over.set_defaults(func=_runner("overload", "run_overload"))
