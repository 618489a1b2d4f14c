"""AWQ checkpoints (``quant_method: awq``, ``version: gemm``) as AutoAWQ writes them.

Per linear layer, eight 4-bit codes to an int32 along the OUTPUT dim, in AutoAWQ's interleaved order
(the ``i``-th nibble holds output ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its eight):

* ``qweight`` int32 ``[in, out / 8]``, ``qzeros`` int32 ``[groups, out / 8]``, ``scales`` float ``[groups, out]``;
* ``W[i, j] = scales[j // group, i] * (code[j, i] - zero[j // group, i])``.

The other AWQ kernels' layouts (``gemv``, ``gemv_fast``, ``marlin``, ``exllama``, ``ipex``) are refused by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmserve.layers.fused_moe.method import FusedMoEMethodBase
from llmserve.quantization.base import QuantizationConfig, QuantizeMethodBase
from llmserve.quantization.checkpoint_moe import QUANTISABLE_LAYERS, method_for_layer
from llmserve.quantization.checkpoint_params import (CheckpointFormatError, add_checkpoint_param, check_input_split,
                                                     drop_params, unpack_int32)
from llmserve.quantization.gptq import check_group_size
from llmserve.quantization.layer_selection import contains_any, covers_all
from llmserve.quantization.packed import U4, apply_weight_only, set_weight_only

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # output of each nibble, lowest nibble first
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)     # nibble of each output


class AWQConfig(QuantizationConfig):
    """``bits`` (4), ``group_size``, ``zero_point`` (true), ``version`` (gemm), ``modules_to_not_convert``."""

    def __init__(self, group_size: int, modules_to_not_convert: list[str] | None = None) -> None:
        check_group_size("AWQ", group_size)
        self.group_size = group_size
        self.modules_to_not_convert = modules_to_not_convert or []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointFormatError(f"AWQ version {version!r} is not supported: llmserve reads the gemm layout")
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if bits != 4:
            raise CheckpointFormatError(f"AWQ with {bits}-bit weights is not supported (4)")
        if not config.get("zero_point", True):
            raise CheckpointFormatError("AWQ without zero points (zero_point: false) is not supported")
        return cls(int(config.get("group_size", config.get("q_group_size", 128))), config.get("modules_to_not_convert"))

    def get_name(self) -> str:
        return "awq"

    def __repr__(self) -> str:
        return f"awq(4-bit gemm, group {self.group_size})"

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | FusedMoEMethodBase | None:
        unconverted = contains_any(self.modules_to_not_convert)
        if not isinstance(layer, QUANTISABLE_LAYERS) or covers_all(prefix, unconverted):
            return None
        return method_for_layer(layer, AWQLinearMethod(self))


class AWQLinearMethod(QuantizeMethodBase):
    """Loads the three AWQ tensors, repacks them as weight-only 4-bit codes."""

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        k, n, group = input_size_per_partition, sum(output_partition_sizes), self.config.group_size
        if any(rows % 8 for rows in output_partition_sizes):
            raise CheckpointFormatError(f"{layer.prefix}: outputs {output_partition_sizes} (per rank) must be "
                                        f"multiples of 8 for AWQ packing")
        check_input_split(layer, "AWQ", group)
        groups, group_dim = (1, None) if group == -1 else (-(-k // group), 0)
        add_checkpoint_param(layer, "qweight", (k, n // 8), torch.int32, output_dim=1, pack_factor=8, input_dim=0)
        add_checkpoint_param(layer, "qzeros", (groups, n // 8), torch.int32, output_dim=1, pack_factor=8,
                             input_dim=group_dim, input_pack=group)
        add_checkpoint_param(layer, "scales", (groups, n), torch.float32, output_dim=1, input_dim=group_dim,
                             input_pack=group)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        k = layer.qweight.shape[0]
        codes = unpack_int32(layer.qweight.data, 4, dim=1, order=AWQ_UNPACK_ORDER).T
        zeros = unpack_int32(layer.qzeros.data, 4, dim=1, order=AWQ_UNPACK_ORDER).T
        group = k if self.config.group_size == -1 else self.config.group_size
        set_weight_only(layer, codes, U4, layer.scales.data.T, zeros, group)
        drop_params(layer, "qweight", "qzeros", "scales")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)
