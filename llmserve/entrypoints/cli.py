"""The ``llmserve`` command: serve, generate, bench, make-checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys

from llmserve.entrypoints.cli_args import add_engine_args, engine_config_from_args


def _generate(args: argparse.Namespace) -> int:
    from llmserve.entrypoints.llm import LLM
    from llmserve.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    llm = LLM(**vars(config))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, max_tokens=args.max_tokens, seed=args.sampling_seed,
                            stop=args.stop or None, ignore_eos=args.ignore_eos)
    prompts = args.prompt or ["Hello, my name is"]
    for output in llm.generate(prompts, params):
        for completion in output.outputs:
            print(f"--- prompt {output.prompt!r} [{completion.index}] ({completion.finish_reason}, "
                  f"{len(completion.token_ids)} tokens)")
            print(completion.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from llmserve.entrypoints.openai.api_server import run_server

    return run_server(args)


def _make_checkpoint(args: argparse.Namespace) -> int:
    from llmserve.testing.checkpoints import write_checkpoint

    path = write_checkpoint(args.output, family=args.family, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} {args.family} checkpoint with random weights to {path}")
    return 0


def _bench_throughput(args: argparse.Namespace) -> int:
    from llmserve.benchmarks.throughput import run_throughput_benchmark

    run_throughput_benchmark(args)
    return 0


def _bench_prefix_cache(args: argparse.Namespace) -> int:
    from llmserve.benchmarks.prefix_cache import run_prefix_cache_benchmark

    run_prefix_cache_benchmark(args)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from llmserve.benchmarks.serve import run_serve_benchmark

    metrics = run_serve_benchmark(args)
    return 0 if metrics["failed"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    from llmserve.testing.checkpoints import FAMILIES, SIZES

    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    from llmserve.entrypoints.openai.api_server import add_server_args

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="generate text for prompts with the offline engine")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)

    ckpt = sub.add_parser("make-checkpoint", help="write a small Hugging Face checkpoint with random weights")
    ckpt.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    ckpt.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ckpt.add_argument("--seed", type=int, default=0)
    ckpt.add_argument("--output", required=True, help="folder to write")
    ckpt.set_defaults(func=_make_checkpoint)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    thr = bench_sub.add_parser("throughput", help="offline throughput on synthetic requests")
    add_engine_args(thr)
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--input-len", type=int, default=128)
    thr.add_argument("--output-len", type=int, default=128)
    thr.add_argument("--compare-hf", action="store_true",
                     help="also run Hugging Face transformers generate (one at a time and static batches)")
    thr.add_argument("--hf-batch-size", type=int, default=None, help="static batch size for HF (default: all)")
    thr.add_argument("--hf-sequential-prompts", type=int, default=None,
                     help="how many prompts HF runs one at a time (default: all); the rate is per token")
    thr.add_argument("--output-json", default=None, help="write the results as JSON")
    thr.set_defaults(func=_bench_throughput)
    pc = bench_sub.add_parser("prefix-cache", help="TTFT with/without prefix caching, n-sample sharing, KV waste")
    add_engine_args(pc)
    pc.add_argument("--prefix-len", type=int, default=2000)
    pc.add_argument("--suffix-len", type=int, default=100)
    pc.add_argument("--num-prompts", type=int, default=8)
    pc.add_argument("--output-len", type=int, default=8)
    pc.add_argument("--n", type=int, default=4, help="parallel samples for the sharing measurement")
    pc.add_argument("--waste-requests", type=int, default=64)
    pc.set_defaults(func=_bench_prefix_cache)
    srv = bench_sub.add_parser("serve", help="load a running OpenAI-compatible server with streaming requests")
    srv.add_argument("--base-url", default="http://127.0.0.1:8000")
    srv.add_argument("--model", default=None, help="model name (default: the server's first)")
    srv.add_argument("--api-key", default=None)
    srv.add_argument("--num-prompts", type=int, default=64)
    srv.add_argument("--random-input-len", type=int, default=128)
    srv.add_argument("--random-output-len", type=int, default=128)
    srv.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    srv.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    srv.add_argument("--max-concurrency", type=int, default=None)
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--metric-percentiles", default="50,99", help="comma-separated percentiles")
    srv.add_argument("--save-result", default=None, help="write the metrics as JSON")
    srv.set_defaults(func=_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
