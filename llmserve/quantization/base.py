"""The two seams a quantisation format implements (the vLLM V1 split).

:class:`QuantizationConfig` is what a checkpoint's quantisation settings parse into; it picks a
:class:`QuantizeMethodBase` per layer (by type and dotted name, so a format can leave some layers,
e.g. the LM head, unquantised). The method owns the layer's weight tensors end to end: their shapes
and dtypes, their one-time repacking after loading, and the matmul. Layers only shard and load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class QuantizeMethodBase(ABC):
    """How one layer stores and applies its weights."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        """Register this rank's parameters on ``layer``.

        ``output_partition_sizes`` lists the (per-rank) rows of each fused projection, so a format
        that keeps per-projection scales can size them; ``input_size``/``output_size`` are the
        unsharded sizes. ``extra_weight_attrs`` (e.g. ``weight_loader``) are set on every parameter.
        """

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack the loaded weights for the kernels ``apply`` uses (once; default: nothing)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T (+ bias)`` for this rank's weight."""


class QuantizationConfig(ABC):
    """A quantisation format's settings; decides which method each layer gets."""

    @abstractmethod
    def get_name(self) -> str:
        """The format's name as configs spell it (e.g. ``"gguf"``)."""

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The method for ``layer`` (dotted name ``prefix``), or None to leave it unquantised."""


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Attach loading metadata (``weight_loader``, ``output_dim``...) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key) and key != "weight_loader":
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)
