"""``llmserve bench latency``: offline TPOT and step time per batch size, for a fixed prompt length.

For each batch size B, B requests of ``--input-len`` random prompt tokens (fresh ones, so the prefix
cache never hits) are added at once and run for ``--output-len`` greedy tokens.

* "all prefilled" is the time from the first step until every sequence has its first token. A large
  batch needs several steps of ``--max-num-batched-tokens`` for that (which also decode the sequences
  prefilled first), so its output length grows by that many steps: all B sequences then still
  decode together for at least a few steps.
* TPOT is the mean wall time of the decode steps that run all B sequences (after ``--skip-steps`` of
  them), split into model forward (+ LM head), sampler and engine overhead (scheduling, inputs,
  detokenising). The median is reported too. With ``--num-scheduler-steps`` a step that runs several decode steps
  counts as that many, each with an equal share of its time.
* Decode throughput (B / step time) and achieved GFLOP/s use the *median* decode step, which a
  neighbour's burst of CPU use on a shared machine moves far less than the mean. The GFLOP/s is
  compared with this machine's float32 GEMM peak (see :mod:`llmserve.benchmarks.roofline`), measured
  in the same run before and after (the better counts) unless ``--no-peak``.
* ``--torch-profile DIR``: after each batch size's timed run, the same batch size runs again with five decode
  steps under ``torch.profiler``: ``DIR/batch-B.txt`` lists operators (and on CUDA the kernels) by their own
  time, ``DIR/batch-B.json`` is the trace.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from llmserve.benchmarks.flags import require_at_least
from llmserve.benchmarks.plotting import pyplot, require_matplotlib
from llmserve.benchmarks.profiling import ModelCosts, decode_steps, profile_decode_steps, summarize
from llmserve.benchmarks.roofline import measure_matmul, random_prompts
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM

PROFILED_STEPS = 5   # decode steps per batch size under --torch-profile


def parse_batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {value!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"--batch-sizes must be positive integers, got {value!r}")
    return sizes


def plot_latency(rows: list[dict[str, Any]], peak: dict[str, Any] | None, path: str, title: str) -> None:
    """TPOT (split into forward / sampler / overhead) and decode tokens/s against the batch size."""
    plt = pyplot()
    import matplotlib.ticker
    sizes = [r["batch_size"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.plot(sizes, [r["median_tpot_ms"] for r in rows], "o-", label="TPOT (median step)")
    ax1.plot(sizes, [r["model_forward_ms"] for r in rows], "s--", label="model forward (mean)")
    ax1.plot(sizes, [r["sampler_ms"] + r["engine_overhead_ms"] for r in rows], "^:", label="sampler + overhead (mean)")
    ax1.set_ylabel("ms per decode step")
    ax1.set_yscale("log")
    ax2.plot(sizes, [r["decode_tokens_per_s"] for r in rows], "o-", color="tab:green", label="decode tokens/s")
    ax2.set_ylabel("decode tokens/s")
    if peak:
        twin = ax2.twinx()
        twin.plot(sizes, [100 * r["fraction_of_peak_flops"] for r in rows], "s--", color="tab:red",
                  label="% of GEMM peak")
        twin.set_ylabel(f"% of the {peak['peak_gflop_s']:.0f} GFLOP/s GEMM peak")
        twin.set_ylim(0, 100)
        lines, more = ax2.get_legend_handles_labels(), twin.get_legend_handles_labels()
        ax2.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    else:
        ax2.legend(fontsize=8)
    ax1.legend(fontsize=8)
    ax1.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("batch size (sequences decoding together)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_latency_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    sizes = parse_batch_sizes(args.batch_sizes)
    require_at_least(args, {"input_len": 1, "skip_steps": 0})
    if args.plot:
        require_matplotlib("bench latency --plot")
    if args.output_len < args.skip_steps + 2:
        raise ValueError(f"--output-len must be at least --skip-steps + 2 ({args.skip_steps + 2})")
    config = engine_config_from_args(args)
    if config.speculative_config is not None:
        raise ValueError("bench latency times steps, and with speculation a step emits several tokens: use "
                         "bench spec-decode for TPOT with --speculative-config")
    if config.max_num_seqs < max(sizes):
        raise ValueError(f"--batch-sizes has {max(sizes)} but --max-num-seqs is {config.max_num_seqs}: a batch must "
                         f"run in one step; raise --max-num-seqs to {max(sizes)} or drop the larger batch sizes")
    llm = LLM(**vars(config))
    engine = llm.engine
    if args.input_len + args.output_len > engine.max_model_len:
        raise ValueError(f"--input-len + --output-len exceed the model's context ({engine.max_model_len})")
    costs = ModelCosts.of(engine)
    print(f"model {engine.model_path} ({engine.dtype}, {engine.device}, {torch.get_num_threads()} threads); "
          f"prompt {args.input_len} tokens, {args.output_len} output tokens; batch sizes {sizes}")
    decode_steps(engine, random_prompts(2, min(8, args.input_len), engine.vocab_size, 7), 4,
                 request_prefix="warmup")
    peak = None if args.no_peak else measure_matmul(args.gemm_size, 3, engine.dtype, engine.device)
    rows = []
    for b in sizes:
        # Every sequence must still be decoding once the last prompt is prefilled (which takes several steps
        # for a large batch): the output length grows by the prefill steps where needed.
        prefill_steps = -(-b * args.input_len // engine.max_num_batched_tokens)
        output_len = max(args.output_len, prefill_steps + args.skip_steps + 4)
        if args.input_len + output_len > engine.max_model_len:
            print(f"batch {b}: skipped, its {output_len} output tokens would exceed the context")
            continue
        blocks = b * -(-(args.input_len + output_len) // engine.config.block_size)
        if blocks > engine.block_manager.num_blocks:
            print(f"batch {b}: skipped, needs {blocks} KV blocks but the cache has "
                  f"{engine.block_manager.num_blocks} (raise --kv-cache-memory-bytes)")
            continue
        prompts = random_prompts(b, args.input_len, engine.vocab_size, seed=10_000 + b)
        prefill, decode = decode_steps(engine, prompts, output_len, skip=args.skip_steps,
                                       request_prefix=f"lat-{b}")
        stats = summarize(decode)
        flops = sum(costs.step_flops(r) for r in decode) / max(1, len(decode))
        gflops = flops / (stats["median_step_ms"] / 1000) / 1e9 if decode else 0.0
        row = {"batch_size": b, "output_len": output_len, "prefill_ms": 1000 * sum(r.wall_s for r in prefill),
               "prefill_steps": len(prefill),
               "decode_steps": stats["steps"], "tpot_ms": stats["step_ms"], "median_tpot_ms": stats["median_step_ms"],
               "model_forward_ms": stats["model_forward_ms"], "sampler_ms": stats["sampler_ms"],
               "engine_overhead_ms": stats["engine_overhead_ms"],
               "decode_tokens_per_s": b * 1000 / stats["median_step_ms"] if decode else 0.0,
               "achieved_gflop_s": gflops,
               "fraction_of_peak_flops": gflops / peak["peak_gflop_s"] if peak else None}
        rows.append(row)
        print(f"batch {b:>4}: all prefilled {row['prefill_ms']:9.1f} ms | TPOT {row['tpot_ms']:8.2f} ms (median "
              f"{row['median_tpot_ms']:.2f}) = forward {row['model_forward_ms']:.2f} + sampler {row['sampler_ms']:.2f}"
              f" + overhead {row['engine_overhead_ms']:.2f} | {row['decode_tokens_per_s']:8.1f} tok/s | "
              f"{gflops:6.1f} GFLOP/s")
        if args.torch_profile:   # a run of its own: the profiler's cost stays out of the timed steps
            files = profile_decode_steps(engine, random_prompts(b, args.input_len, engine.vocab_size, seed=20_000 + b),
                                         PROFILED_STEPS, Path(args.torch_profile) / f"batch-{b}",
                                         request_prefix=f"lat-profile-{b}")
            row["torch_profile"] = [str(f) for f in files]
            print(f"batch {b:>4}: torch.profiler of {PROFILED_STEPS} decode steps: {files[0]}")
    if peak:
        after = measure_matmul(args.gemm_size, 3, engine.dtype, engine.device)   # the machine may be busier now or then: keep the best
        if after["peak_gflop_s"] > peak["peak_gflop_s"]:
            peak = after
        for row in rows:
            row["fraction_of_peak_flops"] = row["achieved_gflop_s"] / peak["peak_gflop_s"]
        print(f"{engine.dtype} GEMM peak {peak['peak_gflop_s']:.1f} GFLOP/s ({peak['path']} path, {args.gemm_size}^3, best of "
              "before and after): " + ", ".join(f"batch {r['batch_size']} {r['fraction_of_peak_flops']:.0%}"
                                                for r in rows))
    report = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "peak": peak, "results": rows}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot and rows:
        plot_latency(rows, peak, args.plot, f"{engine.model_path.name} ({engine.dtype}, {torch.get_num_threads()} "
                     f"threads): prompt {args.input_len} tokens, decode steps with the whole batch")
        print(f"plot: {args.plot}")
    return report
