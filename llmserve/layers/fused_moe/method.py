"""How a fused MoE layer stores and multiplies by its experts: the quantisation seam for experts.

A :class:`~llmserve.quantization.base.QuantizationConfig` returns a :class:`FusedMoEMethodBase` for a
:class:`~llmserve.layers.fused_moe.layer.FusedMoE` layer (as it returns a linear method for a linear
layer), or None for :class:`UnquantizedFusedMoEMethod`. The method owns the stacked expert tensors (their
shapes, dtypes and repacking) and the grouped computation; the layer only shards, loads and routes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmserve.layers.attention.backend import triton_available
from llmserve.layers.cpu_kernels import block_weight
from llmserve.layers.fused_moe.grouped_experts import grouped_experts
from llmserve.quantization.base import set_weight_attrs
from llmserve.quantization.unquantized import blocked_layout_available


class FusedMoEMethodBase(ABC):
    """How one MoE layer stores and applies its experts."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        """Register this rank's ``w13_*`` (gate and up, stacked) and ``w2_*`` (down) parameters on ``layer``
        for ``num_experts`` experts; ``extra_weight_attrs`` (``weight_loader``) are set on every parameter."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack the loaded experts for the kernels ``apply`` uses (once; default: nothing)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """This rank's partial ``sum_s weight * expert(x)`` [T, hidden]; ``topk_ids`` index its local experts,
        and the id ``num_local_experts`` (experts other expert-parallel ranks hold) contributes nothing."""


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    """``w13_weight`` [E, 2I, H] and ``w2_weight`` [E, H, I] in the model dtype; the Triton grouped GEMM on
    CUDA when Triton is installed, else one GEMM per expert over its rows (:func:`grouped_experts`).

    On CPU in float32 or bfloat16 with the compiled kernels, each expert's weight is re-stored blocked after
    loading (as :class:`~llmserve.quantization.unquantized.UnquantizedLinearMethod` does for a linear layer):
    ``[E, out/16, in, 16]`` (bfloat16: ``[E, out/16, in/2, 16, 2]``), which the grouped kernel multiplies for
    every expert's rows in one call per projection.
    """

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        inter = intermediate_size_per_partition
        for name, shape in (("w13_weight", (num_experts, 2 * inter, hidden_size)),
                            ("w2_weight", (num_experts, hidden_size, inter))):
            weight = nn.Parameter(torch.empty(shape, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(weight, extra_weight_attrs)
            layer.register_parameter(name, weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        for param in (layer.w13_weight, layer.w2_weight):
            if param.shape[0] and blocked_layout_available(param[0]):
                param.data = torch.stack([block_weight(expert) for expert in param.data])

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if x.is_cuda and triton_available():
            from llmserve.layers.fused_moe import triton_grouped_gemm

            return triton_grouped_gemm.fused_experts(x, layer.w13_weight, layer.w2_weight, topk_weights,
                                                         topk_ids, activation)
        return grouped_experts(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids, activation)
