"""GPTQ checkpoints (``quant_method: gptq``) as AutoGPTQ and GPTQModel write them.

Per linear layer, with ``pack = 32 // bits`` codes to an int32, lowest bits first:

* ``qweight`` int32 ``[in / pack, out]``: codes packed along the input dim;
* ``qzeros`` int32 ``[groups, out / pack]``: zero points packed along the output dim; the original format
  (``checkpoint_format: gptq``, "v1") stores ``zero - 1``, ``gptq_v2`` the zero itself;
* ``scales`` float ``[groups, out]``; ``g_idx`` int32 ``[in]``: the group of each input column.

``W[i, j] = scales[g_idx[j], i] * (code[j, i] - zero[g_idx[j], i])``. With ``desc_act`` the groups are
not contiguous (columns were quantised in order of activation size): the columns are reordered once so
they are, and each call reorders ``x`` the same way. 4- and 8-bit codes, any ``group_size`` that is -1
or a multiple of 32, symmetric or not.

Under tensor parallelism every rank keeps every group's ``scales``/``qzeros`` and its own slice of ``g_idx``
(vLLM's placement): on a row-parallel layer with ``desc_act`` a rank's columns belong to any group, and
:func:`group_columns` pads the part of each group it holds to whole chunks.
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
from llmserve.quantization.layer_selection import contains_any, covers_all
from llmserve.quantization.packed import CHUNK, U4, U8, apply_weight_only, set_weight_only


def check_group_size(name: str, group_size: int) -> None:
    if group_size != -1 and (group_size < 1 or group_size % CHUNK):
        raise CheckpointFormatError(f"{name} group_size {group_size} is not supported: -1 or a multiple of {CHUNK}")


class GPTQConfig(QuantizationConfig):
    """``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format`` from ``quantization_config``."""

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool, v2_zeros: bool,
                 modules_to_not_convert: list[str] | None = None) -> None:
        if bits not in (4, 8):
            raise CheckpointFormatError(f"GPTQ with {bits}-bit weights is not supported (4 or 8)")
        check_group_size("GPTQ", group_size)
        self.bits, self.group_size, self.desc_act, self.sym, self.v2_zeros = bits, group_size, desc_act, sym, v2_zeros
        self.modules_to_not_convert = modules_to_not_convert or []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        if config.get("lm_head"):
            raise CheckpointFormatError("GPTQ checkpoints with a quantised lm_head are not supported")
        if config.get("is_marlin_format") or config.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise CheckpointFormatError(f"GPTQ checkpoint_format {config.get('checkpoint_format', 'marlin')!r} is "
                                        f"not supported (gptq or gptq_v2)")
        if "bits" not in config:
            raise CheckpointFormatError("GPTQ quantization_config has no 'bits'")
        if config.get("dynamic"):
            raise CheckpointFormatError(f"GPTQ per-module overrides (quantization_config.dynamic: "
                                        f"{sorted(config['dynamic'])}) are not supported: every quantised module "
                                        f"must use the config's bits and group size")
        return cls(int(config["bits"]), int(config.get("group_size", -1)), bool(config.get("desc_act", False)),
                   bool(config.get("sym", True)), config.get("checkpoint_format") == "gptq_v2",
                   config.get("modules_to_not_convert"))

    def get_name(self) -> str:
        return "gptq"

    def __repr__(self) -> str:
        return (f"gptq({self.bits}-bit, group {self.group_size}, desc_act={self.desc_act}, sym={self.sym}, "
                f"{'v2' if self.v2_zeros else 'v1'} zeros)")

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | FusedMoEMethodBase | None:
        unconverted = contains_any(self.modules_to_not_convert)
        if not isinstance(layer, QUANTISABLE_LAYERS) or covers_all(prefix, unconverted):
            return None
        return method_for_layer(layer, GPTQLinearMethod(self))


def group_columns(g_idx: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The column order that makes ``g_idx``'s groups contiguous runs of equal width: ``(order, group of each
    run, run width)``; ``order[i]`` is the input stored column ``i`` multiplies, ``len(g_idx)`` for padding.

    A whole checkpoint's ``g_idx`` (act-order or not) gives ``group`` columns to every group but the last, so
    the runs are the groups. A row-parallel rank's slice of an act-order ``g_idx`` gives each group only the
    columns this rank holds, any number of them: each group is then padded to whole chunks of ``CHUNK`` columns
    that multiply a zero input, and the runs are those chunks.
    """
    k = g_idx.numel()
    perm = torch.argsort(g_idx, stable=True)
    used, counts = torch.unique_consecutive(g_idx[perm], return_counts=True)
    if bool((counts[:-1] == group).all()) and int(counts[-1]) <= group:
        return perm, used, group
    runs = -(-counts // CHUNK)
    pieces = []
    for columns, pad in zip(perm.split(counts.tolist()), (runs * CHUNK - counts).tolist()):
        pieces += [columns, torch.full((pad,), k, dtype=columns.dtype)]
    return torch.cat(pieces), used.repeat_interleave(runs), CHUNK


class GPTQLinearMethod(QuantizeMethodBase):
    """Loads the four GPTQ tensors, repacks them as weight-only codes (:mod:`llmserve.quantization.packed`)."""

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        k, n, pack = input_size_per_partition, sum(output_partition_sizes), 32 // self.config.bits
        check_input_split(layer, "GPTQ", self.config.group_size, pack)
        if k % pack or any(rows % pack for rows in output_partition_sizes):
            raise CheckpointFormatError(f"{layer.prefix}: {k} inputs and outputs {output_partition_sizes} (per rank) "
                                        f"must be multiples of {pack} for {self.config.bits}-bit GPTQ packing")
        # Every group's scales and zeros on every rank: this rank's g_idx slice picks the ones it uses (vLLM's
        # placement for act-order, where a rank's columns belong to any group).
        groups = 1 if self.config.group_size == -1 else -(-layer.input_size // self.config.group_size)
        add_checkpoint_param(layer, "qweight", (k // pack, n), torch.int32, output_dim=1, input_dim=0, input_pack=pack)
        add_checkpoint_param(layer, "qzeros", (groups, n // pack), torch.int32, output_dim=1, pack_factor=pack)
        add_checkpoint_param(layer, "scales", (groups, n), torch.float32, output_dim=1)
        add_checkpoint_param(layer, "g_idx", (k,), torch.int32, output_dim=None, input_dim=0)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        bits, k = self.config.bits, layer.input_size_per_partition
        group = k if self.config.group_size == -1 else self.config.group_size
        codes = unpack_int32(layer.qweight.data, bits, dim=0).T
        zeros = unpack_int32(layer.qzeros.data, bits, dim=1).T + (0 if self.config.v2_zeros else 1)
        if int(layer.g_idx.data.min()) < 0 or int(layer.g_idx.data.max()) >= zeros.shape[1]:
            raise CheckpointFormatError(f"{layer.prefix}.g_idx names groups outside 0..{zeros.shape[1] - 1}")
        order, group_of, width = group_columns(layer.g_idx.data.long(), group)
        identity = width == group and torch.equal(order, torch.arange(k))
        set_weight_only(layer, codes[:, order.clamp(max=k - 1)], U4 if bits == 4 else U8,
                        layer.scales.data.T[:, group_of], zeros[:, group_of], width, None if identity else order,
                        inputs=k)
        drop_params(layer, "qweight", "qzeros", "scales", "g_idx")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)
