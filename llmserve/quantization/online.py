"""``--quantization int8|fp8``: quantise a full-precision checkpoint while loading it.

The float weight loads as usual (sharded by the layer, so tensor parallelism works), then is replaced by:

* ``int8``: per-output-channel symmetric int8 (``max|w| / 127``), activations quantised per token on the
  fly (W8A8, :func:`~llmserve.quantization.packed.apply_w8a8`);
* ``fp8``: per-output-channel float8 e4m3 (``max|w| / 448``) with float activations (weight-only FP8:
  the CPU has no float8 arithmetic, the kernel widens the bytes in registers).

The LM head and embeddings stay in float, as in vLLM. A mixture-of-experts layer's experts are quantised the
same way, each expert's gate/up and down projections on their own (:class:`OnlineFusedMoEMethod`); the router
stays in float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmserve.layers.fused_moe.grouped_experts import grouped_expert_modules
from llmserve.layers.fused_moe.layer import FusedMoE
from llmserve.layers.fused_moe.method import UnquantizedFusedMoEMethod
from llmserve.layers.linear import LinearBase
from llmserve.quantization.base import QuantizationConfig, QuantizeMethodBase
from llmserve.quantization.compressed_tensors import FP8_MAX
from llmserve.quantization.packed import (FP8, apply_w8a8, apply_weight_only, quantize_rows_int8, set_w8a8,
                                          set_weight_only)
from llmserve.quantization.unquantized import UnquantizedLinearMethod


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 codes and per-row scales (``max|w| / 448``, 1 for an all-zero row) of ``weight`` [out, in]."""
    amax = weight.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class OnlineQuantConfig(QuantizationConfig):
    """Every linear layer but the LM head, quantised at load to ``scheme`` (``int8`` or ``fp8``)."""

    def __init__(self, scheme: str) -> None:
        if scheme not in ("int8", "fp8"):
            raise ValueError(f"load-time quantisation is int8 or fp8, got {scheme!r}")
        self.scheme = scheme

    def get_name(self) -> str:
        return self.scheme

    def __repr__(self) -> str:
        return ("int8 (W8A8: per-channel weights, dynamic per-token activations)" if self.scheme == "int8"
                else "fp8 (e4m3 per-channel weights, float activations)")

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | UnquantizedFusedMoEMethod | None:
        if isinstance(layer, FusedMoE):
            return OnlineFusedMoEMethod(self.scheme)
        return OnlineQuantMethod(self.scheme) if isinstance(layer, LinearBase) else None


class OnlineQuantMethod(UnquantizedLinearMethod):
    """Creates and loads the float weight like the unquantised method, then quantises it once."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data.float()
        del layer._parameters["weight"]
        quantize_into(layer, weight, self.scheme)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_quantized(layer, x, bias, self.scheme)


def quantize_into(holder: nn.Module, weight: torch.Tensor, scheme: str) -> None:
    """Store float ``weight`` [out, in] on ``holder`` as ``scheme`` codes and per-channel scales."""
    if scheme == "int8":
        codes, scale = quantize_rows_int8(weight)
        set_w8a8(holder, codes, scale)
    else:
        codes, scale = quantize_fp8_per_channel(weight)
        set_weight_only(holder, codes, FP8, scale, None, weight.shape[1])


def apply_quantized(holder: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, scheme: str) -> torch.Tensor:
    return apply_w8a8(holder, x, bias) if scheme == "int8" else apply_weight_only(holder, x, bias)


class OnlineFusedMoEMethod(UnquantizedFusedMoEMethod):
    """Loads the stacked float experts like the unquantised method, then quantises each expert's ``w13`` and
    ``w2`` on its own (per-channel scales of that expert) and runs them grouped by expert."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        for name in ("w13", "w2"):
            stacked = layer._parameters.pop(f"{name}_weight").data.float()
            experts = nn.ModuleList(nn.Module() for _ in range(stacked.shape[0]))
            for holder, weight in zip(experts, stacked):
                quantize_into(holder, weight, self.scheme)
            layer.add_module(f"{name}_experts", experts)

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return grouped_expert_modules(x, layer.w13_experts, layer.w2_experts, topk_weights, topk_ids, activation,
                                      lambda holder, rows: apply_quantized(holder, rows, None, self.scheme))
