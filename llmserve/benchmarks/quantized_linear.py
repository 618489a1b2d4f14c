"""``python -m llmserve.benchmarks.quantized_linear``: one linear layer of the demo model's shapes, quantised each
way, against the float32 path, at 1 row (a decode step) and 64 rows (a batch).

Every layout is made the way loading makes it (random weights: speed does not depend on the values) and called
through its method's ``apply``; float32 is also timed through PyTorch's ``F.linear``, W8A8 through
``torch._int_mm`` (activations quantised the same way, int32 products scaled back), the alternative to the int8
kernel. Prints one markdown table of microseconds per call (median of ``--repeats`` timed batches of calls) and
the speed-up over float32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.quantization.online import quantize_fp8_per_channel
from llmserve.quantization.packed import (FP8, U4, U8, apply_w8a8, apply_weight_only, quantize_rows_int8, set_w8a8,
                                          set_weight_only)
from llmserve.quantization.unquantized import UnquantizedLinearMethod

DEMO_SHAPES = {"qkv_proj": (768, 1280), "o_proj": (768, 768), "gate_up_proj": (768, 4096), "down_proj": (2048, 768)}


def _layouts(k: int, n: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    weight = torch.randn(n, k) * 0.02
    plain, method = nn.Module(), UnquantizedLinearMethod()
    method.create_weights(plain, k, [n], k, n, torch.float32)
    plain.weight.data.copy_(weight)
    method.process_weights_after_loading(plain)
    w8a8, int4, int8, fp8 = nn.Module(), nn.Module(), nn.Module(), nn.Module()
    codes, scale = quantize_rows_int8(weight)
    set_w8a8(w8a8, codes, scale)
    set_weight_only(int4, torch.randint(0, 16, (n, k)), U4, torch.rand(n, k // 128), torch.rand(n, k // 128) * 15, 128)
    set_weight_only(int8, torch.randint(0, 256, (n, k)), U8, torch.rand(n, k // 128), torch.rand(n, k // 128) * 255,
                    128)
    fp8_codes, fp8_scale = quantize_fp8_per_channel(weight)
    set_weight_only(fp8, fp8_codes, FP8, fp8_scale, None, k)
    int_codes_t = codes.T.contiguous()

    def int_mm(x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_rows_int8(x)
        if xq.shape[0] <= 16:   # torch._int_mm wants more than 16 rows
            xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - xq.shape[0]))
        return (torch._int_mm(xq, int_codes_t)[:x.shape[0]].float() * sx) * scale.reshape(1, -1)

    return {"float32 (blocked kernel)": lambda x: method.apply(plain, x),
            "float32 (torch F.linear)": lambda x: torch.nn.functional.linear(x, weight),
            "int8 W8A8 (int8 kernel; _int_mm above 8 rows)": lambda x: apply_w8a8(w8a8, x, None),
            "int8 W8A8 (torch._int_mm)": int_mm,
            "int4 g128 weight-only": lambda x: apply_weight_only(int4, x, None),
            "int8 g128 weight-only": lambda x: apply_weight_only(int8, x, None),
            "fp8 per-channel weight-only": lambda x: apply_weight_only(fp8, x, None)}


def time_per_call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    calls = max(1, int(0.05 / max(1e-6, _once(fn, x))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples) * 1e6


def _once(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    kernels = cpu_kernels()
    print(f"threads {torch.get_num_threads()}, int8 dot products: "
          f"{kernels.w8a8_dot_path if kernels else 'none (PyTorch)'}\n")
    torch.manual_seed(0)
    time_layouts_over_demo_shapes(_layouts, args.rows, args.repeats)


def time_layouts_over_demo_shapes(layouts: Callable[[int, int], dict[str, Callable[[torch.Tensor], torch.Tensor]]],
                                  rows_list: list[int], repeats: int) -> None:
    """Time every layout ``layouts(k, n)`` builds on the demo model's four projection shapes, summed per row
    count, and print them against the first layout."""
    results: dict[str, dict[int, float]] = {}
    for k, n in DEMO_SHAPES.values():
        for name, fn in layouts(k, n).items():
            for rows in rows_list:
                results.setdefault(name, {}).setdefault(rows, 0.0)
                results[name][rows] += time_per_call(fn, torch.randn(rows, k), repeats)
    print_speedups(results, "layout", "rows", rows_list)


def print_speedups(results: dict[str, dict[int, float]], what: str, unit: str, sizes: list[int]) -> None:
    """A markdown table: microseconds per call of each entry at each size, and the speed-up over the first entry
    (float32)."""
    print(f"| {what} | " + " | ".join(f"{size} {unit}: us (x float32)" for size in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    base = next(iter(results.values()))
    for name, by_size in results.items():
        cells = [f"{by_size[size]:.0f} ({base[size] / by_size[size]:.2f}x)" for size in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
