"""``python -m llmserve.benchmarks.gguf_linear``: the demo model's linear layers as a GGUF file holds them,
packed (Q4_K, Q6_K, Q8_0 through the group-int8 kernel) against the same weights dequantised at load (float32
and bfloat16, through the blocked kernels), at 1, 8 and 64 rows.

Weights are random, quantised by the test k-quantiser and the ``gguf`` package and loaded the way a GGUF
file's are (speed does not depend on the values); each layout is called through its method's ``apply``. Prints
a markdown table of microseconds per call summed over the four projection shapes (median of ``--repeats``
timed batches of calls) and the speed-up over float32.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from llmserve.benchmarks.quantized_linear import time_layouts_over_demo_shapes
from llmserve.layers.cpu_group_int8 import group_int8_kernels
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.quantization.gguf_blocks import decode_rows
from llmserve.quantization.group_int8 import apply_group_int8, set_group_int8
from llmserve.quantization.unquantized import UnquantizedLinearMethod
from llmserve.testing.gguf_kquants import quantize_tensor

PACKED = ("Q4_K", "Q6_K", "Q8_0")


def _float_layer(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    layer, method = nn.Module(), UnquantizedLinearMethod()
    method.create_weights(layer, weight.shape[1], [weight.shape[0]], weight.shape[1], weight.shape[0], weight.dtype)
    layer.weight.data.copy_(weight)
    method.process_weights_after_loading(layer)
    return lambda x: method.apply(layer, x.to(weight.dtype))


def _layouts(k: int, n: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    weight = np.random.default_rng(k + n).standard_normal((n, k)).astype(np.float32) * 0.02
    layouts = {"float32 (dequantised, blocked kernel)": _float_layer(torch.from_numpy(weight)),
               "bfloat16 (dequantised, blocked kernel)": _float_layer(torch.from_numpy(weight).bfloat16())}
    for type_name in PACKED:
        layer = nn.Module()
        set_group_int8(layer, [decode_rows(quantize_tensor(weight, type_name), type_name, k)])
        layouts[f"{type_name} packed (group-int8 kernel)"] = lambda x, layer=layer: apply_group_int8(layer, x, None)
    return layouts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the CPU kernels are not available here: nothing to measure")
    print(f"threads {torch.get_num_threads()}, int8 dot products: "
          f"{group_int8_kernels(kernels).dot_path}\n")
    time_layouts_over_demo_shapes(_layouts, args.rows, args.repeats)


if __name__ == "__main__":
    main()
