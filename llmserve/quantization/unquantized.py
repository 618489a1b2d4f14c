"""Plain float weights: ``[out, in]`` as checkpoints ship them, multiplied by the fastest path.

On CPU in float32 or bfloat16 with the compiled kernels, the weight is re-stored after loading as
``[out/16, in, 16]`` (bfloat16: ``[out/16, in/2, 16, 2]``, see
:func:`~llmserve.layers.cpu_kernels.block_weight`): one copy, which the blocked kernel multiplies for
any number of rows and streams at plain-read speed for a few rows. A bfloat16 weight that stays plain on CPU
(a tied LM head, or one whose rows are not a multiple of 16) goes to the row-major bfloat16 kernel for a few
rows; elsewhere the weight stays plain and ``F.linear`` (or oneDNN on CPU) runs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_kernels import WEIGHT_BLOCK, block_weight, cpu_kernels
from llmserve.quantization.base import QuantizeMethodBase, set_weight_attrs


# Rows up to which the row-major bfloat16 kernel runs a plain bfloat16 weight: measured on the 32000 x 768 and
# 128256 x 2048 heads (docs/benchmarks.md) it beats oneDNN at one row on one and two threads, is level or behind
# from four rows (within the noise at four, behind at 16 on two threads and at 64), where oneDNN's GEMM blocks the
# weight itself. It streams a row-major weight at about half the rate the pair-blocked kernel streams its layout;
# a second, blocked copy of a tied head would be faster still but costs vocab x hidden x 2 bytes.
ROW_MAJOR_BF16_MAX_ROWS = 1


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b``, by the fastest path for the shape and the weight's layout.

    A ``weight`` of more than 2 dims is blocked for the CPU kernels
    (:meth:`UnquantizedLinearMethod.process_weights_after_loading`): they run any number of rows. A plain
    bfloat16 weight on CPU (one that keeps its layout: a tied LM head) goes to the row-major bfloat16 kernel
    for at most :data:`ROW_MAJOR_BF16_MAX_ROWS` rows, oneDNN above. A plain
    weight on CPU in float32: the compiled GEMV for a few rows, else oneDNN; elsewhere (CUDA, other dtypes, no
    kernels) ``F.linear``.
    """
    kernels = cpu_kernels() if x.device.type == "cpu" else None
    if weight.dim() > 2 or (kernels is not None and x.dtype == weight.dtype == torch.bfloat16
                            and weight.is_contiguous() and x.numel() <= ROW_MAJOR_BF16_MAX_ROWS * x.shape[-1]):
        assert kernels is not None, "a blocked weight is only made where the CPU kernels load"
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        linear = kernels.linear_bf16 if weight.dtype == torch.bfloat16 else kernels.linear_blocked
        out = linear(rows, weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        if kernels is not None and x.shape[0] <= kernels.max_linear_rows and x.stride(1) == 1:
            return kernels.linear_small_batch(x, weight, bias)
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def blocked_layout_available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [out, in] can be stored blocked for the CPU kernels."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and weight.dim() == 2
            and weight.shape[0] % WEIGHT_BLOCK == 0 and cpu_kernels() is not None)


class UnquantizedLinearMethod(QuantizeMethodBase):
    """``layer.weight`` [out, in] in the model dtype; blocked after loading where the CPU kernels run."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
                              requires_grad=False)
        # Loaders narrow checkpoint tensors along these dims for tensor parallelism.
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # Same values, one copy: the plain weight is dropped, so memory does not double.
        if blocked_layout_available(layer.weight):
            layer.weight.data = block_weight(layer.weight.data)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_linear(x, layer.weight, bias)
