"""``--quantization int8|fp8``: quantise a full-precision checkpoint while loading it.

The float weight loads as usual (sharded by the layer, so tensor parallelism works), then is replaced by:

* ``int8``: per-output-channel symmetric int8 (``max|w| / 127``), activations quantised per token on the
  fly (W8A8, :func:`~llmserve.quantization.packed.apply_w8a8`);
* ``fp8``: per-output-channel float8 e4m3 (``max|w| / 448``) with float activations (weight-only FP8:
  the CPU has no float8 arithmetic, the kernel widens the bytes in registers).

The LM head and embeddings stay in float, as in vLLM.
"""

from __future__ import annotations

import torch
from torch import nn

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

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        return OnlineQuantMethod(self.scheme) if isinstance(layer, LinearBase) else None


class OnlineQuantMethod(UnquantizedLinearMethod):
    """Creates and loads the float weight like the unquantised method, then quantises it once."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data.float()
        del layer._parameters["weight"]
        if self.scheme == "int8":
            codes, scale = quantize_rows_int8(weight)
            set_w8a8(layer, codes, scale)
        else:
            codes, scale = quantize_fp8_per_channel(weight)
            set_weight_only(layer, codes, FP8, scale, None, weight.shape[1])

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_w8a8(layer, x, bias) if self.scheme == "int8" else apply_weight_only(layer, x, bias)
