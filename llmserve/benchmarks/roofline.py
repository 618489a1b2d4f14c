"""``llmserve bench roofline``: how close the engine's steps come to what this machine allows.

Measures, in one process:

* memory bandwidth of the engine's device (host memory, or a GPU's HBM): a large tensor copy (bytes
  read + bytes written per second) and a large reduction (bytes read per second); the higher of the
  two is used, so the floor is the strict one;
* matmul throughput: a large GEMM in the model's dtype on its device through ``torch.mm``, through the
  path the engine's linear layers take (``apply_linear``: on CPU, the blocked-weight kernel) and, on
  CPU in float32, through oneDNN on a prepacked weight (which the engine does not keep: a second copy
  of the weights); the fastest is the peak;
* the engine's batch-1 decode step, a large-batch decode step (``--decode-batch`` sequences), and the
  full ``max_num_batched_tokens`` steps that prefill that batch's prompts (prompt chunks, plus the
  decodes of sequences already prefilled; the accounting below counts both).

For each step the floor is ``max(bytes read / bandwidth, FLOPs / peak)`` with bytes = every weight
(linear layers, LM head, norms) + the KV cache attention reads, and FLOPs = 2 x weights x tokens for
the linear layers, the LM head only for sampled rows, and 4 x heads x head_dim per query-key pair
for attention. ``fraction of floor`` = floor / measured (1.0 would be at the roof). A step's time is
the median over its steps in a run (a neighbour's burst of CPU use moves it less than the mean), and
every figure is the best of ``--repeats`` runs (batch 1: three runs per repeat), machine peaks
included, so a busy machine (or a neighbour on the same host using memory bandwidth, which no load
average shows) biases neither side.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any, Callable

import torch

from llmserve.benchmarks.profiling import ModelCosts, StepRecord, decode_steps
from llmserve.entrypoints.cli_args import engine_config_from_args
from llmserve.entrypoints.llm import LLM
from llmserve.layers.cpu_kernels import block_weight
from llmserve.quantization.unquantized import apply_linear, blocked_layout_available


BATCH1_RUNS_PER_REPEAT = 3
CPU = torch.device("cpu")


def _best_time(fn: Callable[[], Any], repeats: int, device: torch.device = CPU) -> float:
    """Best wall time of ``fn`` (on CUDA, up to the end of the work it queued)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()   # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5, device: torch.device = CPU
                      ) -> dict[str, float]:
    """GB/s of a large float32 copy (read + write counted) and of a large sum (read only), on ``device``
    (host memory, or the GPU's HBM)."""
    n = max(1, num_bytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), repeats, device)
    read_s = _best_time(lambda: src.sum(), repeats, device)
    copy_gbs = 2 * n * 4 / copy_s / 1e9
    read_gbs = n * 4 / read_s / 1e9
    return {"bytes": n * 4, "copy_gb_s": copy_gbs, "read_gb_s": read_gbs, "bandwidth_gb_s": max(copy_gbs, read_gbs)}


def measure_matmul(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                   device: torch.device = CPU) -> dict[str, Any]:
    """GFLOP/s of a ``size``-cubed GEMM in ``dtype`` on ``device``: ``torch.mm``, the engine's path, and
    (CPU, float32) oneDNN on a prepacked weight."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    w = torch.randn(size, size, dtype=dtype, device=device)
    flops = 2 * size ** 3
    engine_w = block_weight(w) if blocked_layout_available(w) else w   # as the engine stores its weights

    def gflop_s(fn: Callable[[], Any]) -> float:
        return flops / _best_time(fn, repeats, device) / 1e9

    with torch.inference_mode():
        result: dict[str, Any] = {"size": size, "dtype": str(dtype), "device": str(device),
                                  "plain_gflop_s": gflop_s(lambda: torch.mm(a, w.t())),
                                  "engine_gflop_s": gflop_s(lambda: apply_linear(a, engine_w, None)),
                                  "packed_gflop_s": None}
        if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, size)
            result["packed_gflop_s"] = gflop_s(
                lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    paths = {name: result[f"{name}_gflop_s"] for name in ("plain", "engine", "packed") if result[f"{name}_gflop_s"]}
    result["path"] = max(paths, key=paths.__getitem__)
    result["peak_gflop_s"] = paths[result["path"]]
    return result


def measure_machine(repeats: int, bandwidth_bytes: int, gemm_size: int, device: torch.device = CPU,
                    dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return {"memory": measure_bandwidth(bandwidth_bytes, repeats, device),
            "matmul": measure_matmul(gemm_size, repeats, dtype, device)}


def step_roofline(costs: ModelCosts, records: list[StepRecord], bandwidth_gb_s: float,
                  peak_gflop_s: float) -> dict[str, float]:
    """Measured (median) time against the floor, for ``records`` (steps of the same shape)."""
    n = len(records)
    wall = statistics.median(r.wall_s for r in records)
    forward = statistics.median(r.forward_s for r in records)
    nbytes = sum(costs.step_bytes(r) for r in records) / n
    flops = sum(costs.step_flops(r) for r in records) / n
    memory_floor = nbytes / (bandwidth_gb_s * 1e9)
    compute_floor = flops / (peak_gflop_s * 1e9)
    floor = max(memory_floor, compute_floor)
    return {"steps": n, "tokens": sum(r.num_tokens for r in records) / n, "seqs": sum(r.num_seqs for r in records) / n,
            "measured_ms": 1000 * wall, "model_forward_ms": 1000 * forward,
            "bytes": nbytes, "flops": flops, "memory_floor_ms": 1000 * memory_floor,
            "compute_floor_ms": 1000 * compute_floor, "floor_ms": 1000 * floor,
            "bound": "memory" if memory_floor >= compute_floor else "compute",
            "fraction_of_floor": floor / wall, "achieved_gb_s": nbytes / wall / 1e9,
            "achieved_gflop_s": flops / wall / 1e9, "fraction_of_peak_flops": flops / wall / 1e9 / peak_gflop_s}


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(length)] for _ in range(num)]


def _best(runs: list[list[StepRecord]]) -> list[StepRecord]:
    """The run (list of steps of one shape) with the lowest median step time."""
    runs = [r for r in runs if r]
    return min(runs, key=lambda r: statistics.median(x.wall_s for x in r)) if runs else []


def _print_row(name: str, row: dict[str, float]) -> None:
    print(f"{name:<28} {row['tokens']:>7.0f} {row['measured_ms']:>9.2f} {row['model_forward_ms']:>9.2f} "
          f"{row['floor_ms']:>9.2f} "
          f"{row['bound']:>8} {row['fraction_of_floor']:>9.0%} {row['achieved_gb_s']:>9.1f} "
          f"{row['achieved_gflop_s']:>9.1f} {row['fraction_of_peak_flops']:>9.0%}")


def run_roofline_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    config = engine_config_from_args(args)
    llm = LLM(**vars(config))
    engine = llm.engine
    costs = ModelCosts.of(engine)
    vocab = engine.vocab_size
    per_step_prefill = engine.max_num_batched_tokens
    if args.input_len + args.output_len > engine.max_model_len:
        raise ValueError(f"--input-len + --output-len exceed the model's context ({engine.max_model_len})")
    if args.decode_batch > engine.config.max_num_seqs:
        raise ValueError(f"--decode-batch {args.decode_batch} is larger than --max-num-seqs "
                         f"({engine.config.max_num_seqs})")
    print(f"model {engine.model_path} ({engine.dtype}, {engine.device}, {torch.get_num_threads()} threads): "
          f"{costs.weight_bytes / 1e6:.1f} MB of weights read per step, {costs.kv_bytes_per_token} KV bytes "
          f"per token")
    prefill_steps = -(-args.decode_batch * args.input_len // per_step_prefill)
    large_output_len = prefill_steps + 2 + args.output_len
    if args.input_len + large_output_len > engine.max_model_len:
        raise ValueError(f"--input-len + the large batch's {large_output_len} output tokens exceed the model's "
                         f"context ({engine.max_model_len})")
    decode_prompts = random_prompts(1, 8, vocab, 99)
    decode_steps(engine, decode_prompts, 4, request_prefix="warmup")   # first-step costs out of the way
    machine_runs, batch1_runs, large_runs, prefill_runs = [], [], [], []
    for rep in range(args.repeats):
        machine_runs.append(measure_machine(3, args.bandwidth_bytes, args.gemm_size, engine.device, engine.dtype))
        seed = 1000 * rep   # fresh prompts each time: no prefix-cache hits
        for i in range(BATCH1_RUNS_PER_REPEAT):   # cheap: more chances to catch the machine quiet
            _, b1 = decode_steps(engine, random_prompts(1, args.input_len, vocab, seed + 10 + i), args.output_len,
                                 request_prefix=f"b1-{rep}-{i}")
            batch1_runs.append(b1)
        # The first sequences must still be running when the last prompt is prefilled.
        prefill, large = decode_steps(engine, random_prompts(args.decode_batch, args.input_len, vocab, seed + 1),
                                      large_output_len, request_prefix=f"large-{rep}")
        large_runs.append(large)
        prefill_runs.append([r for r in prefill if r.num_tokens == per_step_prefill])
    bandwidth = max(m["memory"]["bandwidth_gb_s"] for m in machine_runs)
    best_memory = max((m["memory"] for m in machine_runs), key=lambda m: m["bandwidth_gb_s"])
    best_matmul = max((m["matmul"] for m in machine_runs), key=lambda m: m["peak_gflop_s"])
    peak = best_matmul["peak_gflop_s"]
    rows: dict[str, Any] = {}
    rows["decode_batch_1"] = step_roofline(costs, _best(batch1_runs), bandwidth, peak)
    if _best(large_runs):
        rows[f"decode_batch_{args.decode_batch}"] = step_roofline(costs, _best(large_runs), bandwidth, peak)
    if _best(prefill_runs):
        rows[f"prefill_step_{per_step_prefill}_tokens"] = step_roofline(costs, _best(prefill_runs), bandwidth, peak)
    print(f"memory bandwidth: copy {best_memory['copy_gb_s']:.1f} GB/s (read + write), read {best_memory['read_gb_s']:.1f}"
          f" GB/s -> {bandwidth:.1f} GB/s used")
    print(f"matmul {engine.dtype} {best_matmul['size']}^3 on {engine.device}: "
          f"torch.mm {best_matmul['plain_gflop_s']:.1f} GFLOP/s, "
          f"engine path {best_matmul['engine_gflop_s']:.1f} GFLOP/s"
          + (f", oneDNN packed {best_matmul['packed_gflop_s']:.1f} GFLOP/s" if best_matmul["packed_gflop_s"] else "")
          + f" -> peak {peak:.1f} GFLOP/s")
    print(f"decode floor at batch 1: {costs.weight_bytes / 1e6:.0f} MB weights + KV / {bandwidth:.1f} GB/s = "
          f"{rows['decode_batch_1']['floor_ms']:.2f} ms; prefill floor: {2 * costs.body_params / 1e9:.3f} GFLOP "
          f"per token / peak = {2 * costs.body_params / (peak * 1e9) * 1e3:.3f} ms per token (+ attention)")
    print(f"{'step':<28} {'tokens':>7} {'ms':>9} {'forward':>9} {'floor ms':>9} {'bound':>8} {'of floor':>9} "
          f"{'GB/s':>9} {'GFLOP/s':>9} {'of peak':>9}")
    for name, row in rows.items():
        _print_row(name, row)
    report = {"config": {k: v for k, v in vars(args).items() if k != "func"},
              "model": {"path": str(engine.model_path), "dtype": str(engine.dtype), "threads": torch.get_num_threads(),
                        "weight_bytes": costs.weight_bytes, "body_params": costs.body_params,
                        "lm_head_params": costs.lm_head_params, "kv_bytes_per_token": costs.kv_bytes_per_token},
              "machine": {"memory": best_memory, "matmul": best_matmul, "runs": machine_runs},
              "steps": rows}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report
