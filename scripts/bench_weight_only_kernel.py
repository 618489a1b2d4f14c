"""Times the weight-only layout's two GPU paths against the bf16 matmul, per layer shape and row count.

For each format (float8 per channel as ``--quantization fp8`` makes it, 4-bit with zero points in 128-column
groups as GPTQ/AWQ, 4-bit with offsets in 32-column groups as a GGUF Q4_K file) and each Llama-3.2-1B layer
shape, prints the milliseconds of the Triton matmul kernel (forced at every row count), of decoding the weight
and running the bf16 GEMM (forced likewise), and of the bf16 GEMM on a plain weight; and the kernel's read
bandwidth at one row. ``MAX_KERNEL_ROWS`` in ``llmserve/quantization/triton_weight_only.py`` is where the two
paths should cross.

Usage (on a CUDA machine): python scripts/bench_weight_only_kernel.py [--rows 1,16,64,128,512,2048]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from llmserve.quantization import triton_weight_only as wo
from llmserve.quantization.packed import FP8, U4

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


def packed_weight(code_format: int, n: int, k: int, group: int, shift: str | None) -> dict:
    """Random codes, scales and zero points / offsets of one layer, on the GPU."""
    dev = torch.device("cuda")
    if code_format == U4:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    else:
        codes = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).view(torch.uint8)
    groups = -(-k // group)
    scales = torch.rand(n, groups, device=dev) * 0.01
    extra = torch.rand(n, groups, device=dev) * (8 if shift == "zeros" else 0.01)
    return dict(codes=codes, code_format=code_format, scales=scales, group=group, inputs=k,
                zeros=extra if shift == "zeros" else None, offsets=extra if shift == "offsets" else None)


def time_path(weight: dict, rows: torch.Tensor, max_kernel_rows: int) -> float:
    wo.MAX_KERNEL_ROWS = max_kernel_rows
    return do_bench(lambda: wo.weight_only_linear(rows, bias=None, **weight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,64,128,512,2048")
    row_counts = [int(r) for r in parser.parse_args().rows.split(",")]
    formats = {"fp8/channel": (FP8, None, None), "u4/g128+zeros": (U4, 128, "zeros"),
               "u4/g32+offsets": (U4, 32, "offsets")}
    print(f"{torch.cuda.get_device_name()}: ms per call (kernel | decode + GEMM | bf16 GEMM)")
    for name, (code_format, group, shift) in formats.items():
        for layer, (n, k) in SHAPES.items():
            weight = packed_weight(code_format, n, k, group or k, shift)
            plain = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            cells = []
            for m in row_counts:
                rows = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                kernel, decoded = time_path(weight, rows, 1 << 30), time_path(weight, rows, 0)
                gemm = do_bench(lambda: F.linear(rows, plain))
                cells.append(f"{m}: {kernel:.4f} | {decoded:.4f} | {gemm:.4f}")
                if m == 1:
                    read = weight["codes"].numel() + weight["scales"].numel() * 4 * (2 if shift else 1)
                    cells[-1] += f" ({read / kernel / 1e6:.0f} GB/s)"
            print(f"{name:15s} {layer:8s} {n}x{k}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
