"""The ``llmserve`` command: serve, generate, bench, make-checkpoint, make-trained-model."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

from llmserve.entrypoints.cli_args import add_engine_args, engine_config_from_args
from llmserve.logging_setup import add_logging_args, configure_logging, setup_from_args


def _generate(args: argparse.Namespace) -> int:
    from llmserve.entrypoints.llm import LLM
    from llmserve.lora.request import LoRARequest
    from llmserve.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    if args.lora is not None and not config.enable_lora:
        raise ValueError("generate: --lora needs --enable-lora")
    if config.enable_lora and args.lora is None:
        raise ValueError("generate: --enable-lora does nothing without an adapter: name it with --lora PATH")
    llm = LLM(**vars(config))
    lora = None if args.lora is None else LoRARequest(Path(args.lora).name or "adapter", 1, args.lora)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, max_tokens=args.max_tokens, seed=args.sampling_seed,
                            stop=args.stop or None, ignore_eos=args.ignore_eos)
    prompts = args.prompt or ["Hello, my name is"]
    for output in llm.generate(prompts, params, lora_request=lora, use_tqdm=False):
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


def _make_trained_model(args: argparse.Namespace) -> int:
    import json

    from llmserve.testing.trained_model import REPORT_FILE, trained_model_path

    path = trained_model_path(args.preset, steps=args.steps, seed=args.seed, output=args.output, threads=args.threads,
                              distill_from=args.distill_from)
    report = json.loads((path / REPORT_FILE).read_text())
    print(f"{path}: {args.preset} model, {report['parameters']:,} parameters, held-out loss "
          f"{report['held_out_loss']} (unigram {report['unigram_held_out_loss']}), trained in {report['train_time_s']} s")
    return 0


def _bench(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A ``bench`` subcommand that imports its module only when it runs (``llmserve --help`` stays fast)."""

    def run(args: argparse.Namespace) -> int:
        getattr(importlib.import_module(f"llmserve.benchmarks.{module}"), function)(args)
        return 0

    return run


def _bench_serve(args: argparse.Namespace) -> int:
    from llmserve.benchmarks.serve import run_serve_benchmark

    metrics = run_serve_benchmark(args)
    return 0 if metrics["failed"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    from llmserve.testing.checkpoints import FAMILIES, SIZES

    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    add_logging_args(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    from llmserve.entrypoints.openai.server_args import add_server_args

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
    gen.add_argument("--lora", default=None, metavar="PATH", help="a PEFT LoRA adapter folder to generate with "
                                                                  "(with --enable-lora)")
    gen.set_defaults(func=_generate)

    ckpt = sub.add_parser("make-checkpoint", help="write a small Hugging Face checkpoint with random weights")
    ckpt.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    ckpt.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ckpt.add_argument("--seed", type=int, default=0)
    ckpt.add_argument("--output", required=True, help="folder to write")
    ckpt.set_defaults(func=_make_checkpoint)

    trained = sub.add_parser("make-trained-model",
                             help="train a small Llama-shaped model on the bundled corpus (cached like the demo model)")
    presets = ["target", "target-large", "draft", "tiny"]
    trained.add_argument("--preset", default="target", choices=presets,
                         help="target: ~5M parameters; target-large: ~29M, a forward that dominates a CPU step; "
                              "draft: ~1.5M, same tokenizer; tiny: seconds, for tests")
    trained.add_argument("--distill-from", default=None, choices=presets, metavar="PRESET",
                         help="learn this preset's model's next-token distributions (trained first if need be) "
                              "instead of the text's tokens: a draft model for that target")
    trained.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    trained.add_argument("--seed", type=int, default=0)
    trained.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    trained.add_argument("--output", default=None,
                         help="folder to write (default: ~/.cache/llmserve/models/llmserve-trained-<preset>...)")
    trained.set_defaults(func=_make_trained_model)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    thr = bench_sub.add_parser("throughput", help="offline throughput on synthetic requests")
    add_engine_args(thr)
    thr.add_argument("--dataset-name", default="random", choices=["random", "sharegpt"],
                     help="random: fixed lengths; sharegpt: ShareGPT-shaped lengths (synthetic unless --dataset-path)")
    thr.add_argument("--dataset-path", default=None, help="a ShareGPT JSON file (with --dataset-name sharegpt)")
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--input-len", type=int, default=128, help="prompt tokens (random)")
    thr.add_argument("--output-len", type=int, default=128, help="output tokens (random)")
    thr.add_argument("--random-range-ratio", type=float, default=0.0,
                     help="random lengths are uniform in [len * (1 - r), len * (1 + r)]")
    thr.add_argument("--sharegpt-output-len", type=int, default=None,
                     help="fixed output length for sharegpt requests (default: the dataset's)")
    thr.add_argument("--compare-hf", action="store_true",
                     help="also run Hugging Face transformers generate (one at a time and static batches)")
    thr.add_argument("--hf-batch-size", type=int, default=None,
                     help="static batch size for HF (default: all requests, at most 64)")
    thr.add_argument("--hf-sequential-prompts", type=int, default=None,
                     help="how many prompts HF runs one at a time (default: all); the rate is per token")
    thr.add_argument("--output-json", default=None, help="write the results as JSON")
    thr.set_defaults(func=_bench("throughput", "run_throughput_benchmark"))
    lora = bench_sub.add_parser("lora", help="throughput with LoRA off, on without adapters, one adapter, mixed")
    add_engine_args(lora)
    lora.add_argument("--num-prompts", type=int, default=64)
    lora.add_argument("--input-len", type=int, default=128)
    lora.add_argument("--output-len", type=int, default=128)
    lora.add_argument("--lora-path", nargs="+", default=None, help="PEFT adapter folders (default: random ones)")
    lora.add_argument("--lora-rank", type=int, default=8, help="rank of the random adapters")
    lora.add_argument("--rounds", type=int, default=2,
                      help="rounds of the four configurations (engines of one process, stepped in turn); "
                           "ratios of the throughput summed over the rounds")
    lora.add_argument("--output-json", default=None, help="write the results as JSON")
    lora.set_defaults(func=_bench("lora", "run_lora_benchmark"))
    pc = bench_sub.add_parser("prefix-cache", help="TTFT with/without prefix caching, n-sample sharing, KV waste")
    add_engine_args(pc)
    pc.add_argument("--prefix-len", type=int, default=2000)
    pc.add_argument("--suffix-len", type=int, default=100)
    pc.add_argument("--num-prompts", type=int, default=8)
    pc.add_argument("--output-len", type=int, default=8)
    pc.add_argument("--n", type=int, default=4, help="parallel samples for the sharing measurement")
    pc.add_argument("--waste-requests", type=int, default=64)
    pc.set_defaults(func=_bench("prefix_cache", "run_prefix_cache_benchmark"))
    from llmserve.benchmarks.reliability.commands import add_reliability_commands
    from llmserve.benchmarks.serve_args import add_serve_args

    srv = bench_sub.add_parser("serve", help="load a running OpenAI-compatible server with streaming requests")
    add_serve_args(srv)
    srv.set_defaults(func=_bench_serve)
    swp = bench_sub.add_parser("sweep", help="bench serve at increasing request rates: plot and capacity")
    add_serve_args(swp, sweep=True)
    swp.add_argument("--request-rates", default="1,2,4,8", help="comma-separated requests/s (Poisson)")
    swp.add_argument("--slo", nargs="+", default=None, metavar="METRIC_STAT:MS",
                     help="targets for the capacity, e.g. ttft_p99:2000 tpot_p99:100")
    swp.add_argument("--plot", default="sweep.png", help="PNG to draw ('' for none)")
    swp.set_defaults(func=_bench("sweep", "run_sweep"))
    lat = bench_sub.add_parser("latency", help="offline TPOT and step time per batch size")
    add_engine_args(lat)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=32)
    lat.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256", help="comma-separated batch sizes")
    lat.add_argument("--skip-steps", type=int, default=2, help="decode steps per batch size left out as warm-up")
    lat.add_argument("--gemm-size", type=int, default=2048, help="matrix size of the GEMM peak measurement")
    lat.add_argument("--no-peak", action="store_true", help="do not measure the GEMM peak")
    lat.add_argument("--output-json", default=None, help="write the results as JSON")
    lat.add_argument("--plot", default=None, help="draw TPOT and tokens/s against the batch size into this PNG")
    lat.add_argument("--torch-profile", default=None, metavar="DIR",
                     help="also run each batch size's decode steps under torch.profiler (a run of its own, untimed): "
                          "operators and GPU kernels by their own time in DIR/batch-B.txt, the trace in DIR/batch-B.json")
    lat.set_defaults(func=_bench("latency", "run_latency_benchmark"))
    spec = bench_sub.add_parser("spec-decode", help="TPOT with --speculative-config against without, at batch 1 or a concurrency sweep")
    add_engine_args(spec)
    spec.add_argument("--num-prompts", type=int, default=None,
                      help="prompts (default 8, one at a time); with --concurrency, requests at each concurrency, at "
                           "most that many at once (default 4 x the concurrency)")
    spec.add_argument("--passage-len", type=int, default=256, help="tokens of the corpus passage in each prompt")
    spec.add_argument("--repeat-len", type=int, default=32, help="tokens of the passage repeated after it")
    spec.add_argument("--output-len", type=int, default=128)
    spec.add_argument("--output-json", default=None, help="write the results as JSON")
    spec.add_argument("--concurrency", default=None,
                      help="comma-separated numbers of concurrent requests, e.g. 1,8,32,64: speculation on against "
                           "off at each, the two engines stepped in turn (instead of the batch-1 comparison)")
    spec.add_argument("--workload", default="repeat", choices=("repeat", "random"),
                      help="with --concurrency: repeating prompts, or random token ids (nothing to look up)")
    spec.add_argument("--rounds", type=int, default=None,
                      help="with --concurrency: rounds of off and on per concurrency (default 2)")
    spec.add_argument("--plot", default=None,
                      help="with --concurrency: draw the speed-ups against the concurrency into this PNG")
    spec.add_argument("--plot-runs", nargs="+", default=None, metavar="JSON",
                      help="with --plot: earlier sweeps' --output-json files, drawn in the same figure")
    spec.set_defaults(func=_bench("spec_decode", "run_spec_decode_benchmark"))
    ppl = bench_sub.add_parser("perplexity", help="perplexity of a text (default: the held-out corpus) through the engine")
    add_engine_args(ppl)
    ppl.add_argument("--text-file", default=None, help="UTF-8 text to score (default: the held-out end of the corpus)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half the window)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    ppl.add_argument("--output-json", default=None, help="write the results as JSON")
    ppl.set_defaults(func=_bench("perplexity", "run_perplexity_benchmark"))
    roof = bench_sub.add_parser("roofline", help="memory bandwidth and GEMM peak against the engine's steps")
    add_engine_args(roof)
    roof.add_argument("--input-len", type=int, default=128)
    roof.add_argument("--output-len", type=int, default=32, help="output tokens of each measured run")
    roof.add_argument("--decode-batch", type=int, default=256, help="sequences in the large-batch decode step")
    roof.add_argument("--repeats", type=int, default=2, help="runs of every measurement; the best counts")
    roof.add_argument("--bandwidth-bytes", type=int, default=512 * 2**20, help="size of the copied tensor")
    roof.add_argument("--gemm-size", type=int, default=2048, help="matrix size of the GEMM peak measurement")
    roof.add_argument("--output-json", default=None, help="write the results as JSON")
    roof.set_defaults(func=_bench("roofline", "run_roofline_benchmark"))
    add_reliability_commands(bench_sub)
    _add_logging_to_commands(sub)
    return parser


def _add_logging_to_commands(subcommands: argparse._SubParsersAction) -> None:
    """The logging flags on every command too (``llmserve serve MODEL --log-level debug``), not only before it."""
    for command in subcommands.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_logging_to_commands(nested[0])
        else:
            add_logging_args(command, defaults=False)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(setup_from_args(args))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
