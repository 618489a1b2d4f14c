"""``python -m llmserve.benchmarks.lora_kernel``: the CPU LoRA kernel over one decode step of the demo model's shapes
(``--layers`` x q/k/v, o, gate/up, down), one adapter for every row against ``--adapters`` mixed round-robin, for
one or more builds of the kernel library taking turns (``--library``; default: the one the engine loads).

Each layer has its own slots (random adapters of ``--rank`` in every slot) and its base matmul runs before its LoRA
call, so the slots come from memory as in a model's step (eight rank-64 adapters over 12 layers are 167 MB, past
the L3 cache) rather than from a cache a loop over one layer would keep them in. Prints one markdown table:
milliseconds a step spends in the LoRA calls (the fastest of ``--repeats`` steps), per projection and in all.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import numpy as np
import torch

from llmserve.benchmarks.quantized_linear import DEMO_SHAPES
from llmserve.layers.cpu_kernel_build import build_library
from llmserve.lora.cpu_ops import CPULoRALayer, bind_library
from llmserve.lora.punica import LoRABatchMapping, new_stack

CPU = torch.device("cpu")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Each projection's output split as the demo model fuses it: q/k/v (768, 256, 256), gate/up (2048, 2048).
SPLITS = {"qkv_proj": [768, 256, 256], "o_proj": [768], "gate_up_proj": [2048, 2048], "down_proj": [768]}


class Layer:
    """One linear layer: a base weight and ``slots`` adapters of ``rank``, bound to each library's kernel."""

    def __init__(self, name: str, slots: int, rank: int, dtype: torch.dtype, libraries: list[ctypes.CDLL]) -> None:
        in_features, out_features = DEMO_SHAPES[name]
        bounds = np.cumsum([0] + SPLITS[name]).tolist()
        assert bounds[-1] == out_features
        self.weight = (torch.randn(out_features, in_features) * 0.02).to(dtype)
        self.stack = new_stack(slots, rank, in_features, bounds, dtype, CPU)
        self.stack.a.copy_(torch.randn(self.stack.a.shape) * 0.02)
        self.stack.b.copy_(torch.randn(self.stack.b.shape) * 0.02)
        self.stack.ranks[:] = [rank] * slots
        self.ranks, self.bounds = torch.full((slots,), rank, dtype=torch.int64), torch.tensor(bounds)
        self.kernels = [CPULoRALayer(self.stack, self.ranks, self.bounds, library) for library in libraries]

    def lora_ms(self, library: int, x: torch.Tensor, mapping: LoRABatchMapping) -> float:
        """The base matmul, then the timed LoRA call on ``library``'s kernel."""
        out = torch.mm(x, self.weight.t())
        start = time.perf_counter()
        self.kernels[library].add(out, x, mapping)
        return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="decode rows of the step")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--library", type=Path, action="append", help="a built kernel library (repeatable)")
    args = parser.parse_args(argv)
    if args.rows < args.adapters:
        parser.error(f"--rows ({args.rows}) must be at least --adapters ({args.adapters})")
    paths = args.library or [build_library()]
    libraries = [bind_library(path) for path in paths]
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    layers = [{name: Layer(name, args.adapters, args.rank, dtype, libraries) for name in DEMO_SHAPES}
              for _ in range(args.layers)]
    inputs = {k: torch.randn(args.rows, k).to(dtype) for k in {k for k, _ in DEMO_SHAPES.values()}}
    ones = np.ones(args.rows, dtype=np.int64)
    mappings = {"1": LoRABatchMapping.build(np.zeros(args.rows, dtype=np.int64), ones, CPU),
                f"{args.adapters} mixed": LoRABatchMapping.build(np.arange(args.rows) % args.adapters, ones, CPU)}
    best = {(i, kind): dict.fromkeys(DEMO_SHAPES, float("inf")) for i in range(len(libraries)) for kind in mappings}
    for repeat in range(args.repeats + 1):   # the first round warms up
        for i in range(len(libraries)):
            for kind, mapping in mappings.items():
                step = dict.fromkeys(DEMO_SHAPES, 0.0)
                for layer in layers:
                    for name in DEMO_SHAPES:
                        step[name] += layer[name].lora_ms(i, inputs[DEMO_SHAPES[name][0]], mapping)
                if repeat:
                    best[i, kind] = {name: min(best[i, kind][name], step[name]) for name in DEMO_SHAPES}
    print(f"{args.dtype}, rank {args.rank}, {args.rows} rows, {args.layers} layers, {torch.get_num_threads()} threads; "
          f"fastest of {args.repeats} steps (ms in the LoRA calls)")
    print("".join(f"library {i}: {path}\n" for i, path in enumerate(paths)))
    print("| library | adapters | " + " | ".join(DEMO_SHAPES) + " | all |\n" + "|---" * (len(DEMO_SHAPES) + 3) + "|")
    for (i, kind), times in best.items():
        print(f"| {i} | {kind} | " + " | ".join(f"{t:.2f}" for t in times.values()) + f" | {sum(times.values()):.2f} |")


if __name__ == "__main__":
    main()
