"""``python -m llmserve.benchmarks.moe_layer``: one mixture-of-experts layer of the Mixtral bench shape (8 experts,
hidden 768, intermediate 1024, top-2) against the dense MLP with the same active parameters (intermediate 2048),
at a few token counts (one decode row, a 64-sequence decode step, a prefill chunk).

The MoE layer is the model's :class:`~llmserve.layers.fused_moe.FusedMoE` loaded and post-processed as the loader
does (its experts blocked for the CPU kernels), run on random top-2 routing; the dense MLP is the model's CPU path
(blocked gate/up and down weights through :func:`~llmserve.quantization.unquantized.apply_linear`, SiLU-and-multiply
between). The two alternate call by call and each reports its fastest of ``--repeats`` timed calls: on a shared
machine the fastest call is the one least disturbed by other work.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from llmserve.layers.activation import gated_activation
from llmserve.layers.cpu_kernels import block_weight, cpu_kernels
from llmserve.layers.fused_moe import FusedMoE
from llmserve.quantization.unquantized import apply_linear

EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 8, 768, 1024, 2
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def moe_layer(dtype: torch.dtype) -> FusedMoE:
    layer = FusedMoE(EXPERTS, HIDDEN, INTERMEDIATE, params_dtype=dtype)
    for expert in range(EXPERTS):
        for projection, shape in (("w1", (INTERMEDIATE, HIDDEN)), ("w3", (INTERMEDIATE, HIDDEN)),
                                  ("w2", (HIDDEN, INTERMEDIATE))):
            param = layer.w2_weight if projection == "w2" else layer.w13_weight
            layer.weight_loader(param, (torch.randn(shape) * 0.02).to(dtype), (expert, projection))
    layer.process_weights_after_loading()
    return layer


def dense_mlp(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The dense MLP with as many active parameters as a token uses in the MoE layer (intermediate top_k x 1024)."""
    inter = TOP_K * INTERMEDIATE
    gate_up = block_weight((torch.randn(2 * inter, HIDDEN) * 0.02).to(dtype))
    down = block_weight((torch.randn(HIDDEN, inter) * 0.02).to(dtype))
    act = gated_activation("silu")
    return lambda x: apply_linear(act(apply_linear(x, gate_up, None)), down, None)


def fastest_alternating(calls: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Milliseconds of each call's fastest run, the calls taking turns."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 2048])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    if cpu_kernels() is None:
        raise SystemExit("the CPU kernels do not load here: this benchmark measures their MoE path")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    layer, dense = moe_layer(dtype), dense_mlp(dtype)
    print(f"{args.dtype}, {torch.get_num_threads()} threads; fastest of {args.repeats} alternating calls (ms)\n")
    print("| tokens | dense MLP | MoE layer | MoE / dense |\n|---|---|---|---|")
    for tokens in args.tokens:
        x = torch.randn(tokens, HIDDEN).to(dtype)
        ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(tokens)])
        weights = torch.rand(tokens, TOP_K).softmax(-1)
        best = fastest_alternating({"dense": lambda: dense(x), "moe": lambda: layer(x, weights, ids)},
                                   max(3, args.repeats // (1 + tokens // 256)))
        print(f"| {tokens} | {best['dense']:.3f} | {best['moe']:.3f} | {best['moe'] / best['dense']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
