"""``python -m llmserve.benchmarks.quantized_experts``: one mixture-of-experts layer of the Mixtral bench shape
(8 experts, hidden 768, intermediate 1024, top-2) with its experts in float32 and as each checkpoint format stores
them, at a few token counts (a decode step's, a small and a large batch's).

Each layer is built and loaded the way a checkpoint loads it (per expert and projection, through the layer's
loaders, then ``process_weights_after_loading``) from random tensors in the format's layout (speed does not depend
on the values), and timed through its forward on random routing that reaches every expert. Prints a markdown
table of microseconds per call (median of ``--repeats`` timed batches of calls) and the speed-up over float32.
"""

from __future__ import annotations

import argparse

import torch

from llmserve.benchmarks.quantized_linear import print_speedups, time_per_call
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.fused_moe import FusedMoE
from llmserve.quantization.awq import AWQConfig
from llmserve.quantization.base import QuantizationConfig
from llmserve.quantization.compressed_tensors import CompressedTensorsConfig
from llmserve.quantization.gptq import GPTQConfig

EXPERTS, HIDDEN, INTERMEDIATE, TOP_K, GROUP = 8, 768, 1024, 2, 128
INT32 = (-2 ** 31, 2 ** 31 - 1)
W8A8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}}}}


def _tensors(fmt: str, out: int, inp: int) -> dict[str, torch.Tensor]:
    """One projection's checkpoint tensors in ``fmt``'s layout (random values)."""
    groups = inp // GROUP
    if fmt == "gptq":
        return {"qweight": torch.randint(*INT32, (inp // 8, out), dtype=torch.int32),
                "qzeros": torch.randint(*INT32, (groups, out // 8), dtype=torch.int32),
                "scales": torch.rand(groups, out) * 1e-3, "g_idx": (torch.arange(inp) // GROUP).int()}
    if fmt == "awq":
        return {"qweight": torch.randint(*INT32, (inp, out // 8), dtype=torch.int32),
                "qzeros": torch.randint(*INT32, (groups, out // 8), dtype=torch.int32),
                "scales": torch.rand(groups, out) * 1e-3}
    if fmt == "w8a8":
        return {"weight": torch.randint(-127, 128, (out, inp), dtype=torch.int8),
                "weight_scale": torch.rand(out, 1) * 1e-4}
    return {"weight": torch.randn(out, inp) * 0.02}


def build_layer(fmt: str, config: QuantizationConfig | None) -> FusedMoE:
    """The layer with every expert loaded from ``fmt`` tensors and post-processed, as the model loader does."""
    layer = FusedMoE(EXPERTS, HIDDEN, INTERMEDIATE, quant_config=config, prefix="model.layers.0.mlp.experts")
    params = dict(layer.named_parameters())
    shapes = {"w1": (INTERMEDIATE, HIDDEN), "w3": (INTERMEDIATE, HIDDEN), "w2": (HIDDEN, INTERMEDIATE)}
    for expert in range(EXPERTS):
        for projection, (out, inp) in shapes.items():
            for name, tensor in _tensors(fmt, out, inp).items():
                param = params[f"{'w2' if projection == 'w2' else 'w13'}_{name}"]
                param.weight_loader(param, tensor, (expert, projection))
    layer.process_weights_after_loading()
    return layer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"threads {torch.get_num_threads()}, CPU kernels: {'on' if cpu_kernels() else 'off'}\n")
    torch.manual_seed(0)
    layers = {"float32": build_layer("float32", None),
              "GPTQ 4-bit group 128": build_layer("gptq", GPTQConfig(4, GROUP, False, True, False)),
              "AWQ 4-bit group 128": build_layer("awq", AWQConfig(GROUP)),
              "compressed-tensors W8A8": build_layer("w8a8", CompressedTensorsConfig.from_config(W8A8))}
    results: dict[str, dict[int, float]] = {name: {} for name in layers}
    for tokens in args.tokens:
        ids = torch.stack([torch.randperm(EXPERTS)[:TOP_K] for _ in range(tokens)])
        weights = torch.rand(tokens, TOP_K)
        for name, layer in layers.items():
            results[name][tokens] = time_per_call(lambda x, layer=layer, w=weights, i=ids: layer(x, w, i),
                                                  torch.randn(tokens, HIDDEN), args.repeats)
    print_speedups(results, "experts", "tokens", args.tokens)


if __name__ == "__main__":
    main()
