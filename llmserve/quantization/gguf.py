"""GGUF files' quantised linear weights kept packed: the group-int8 kernel on CPU, the weight-only one on CUDA.

A layer whose every projection the file stores in one of :data:`~llmserve.quantization.gguf_blocks.PACKED_TYPES`
gets :class:`GGUFLinearMethod`: the loader hands it each projection's rows of GGUF blocks as they are in the
file (``<name>.qweight``, uint8 ``[rows, row bytes]``, rows in the order transformers' processor gives them) and
their type (``<name>.qweight_type``, one byte per row); after loading they are decoded into codes with the file's scales
(:mod:`llmserve.quantization.gguf_blocks`) and repacked instead of kept as a float copy. On CPU they become
group-int8 segments (:mod:`llmserve.quantization.group_int8`; a Q4_K weight runs from 4.6 bits), on CUDA the
weight-only layout with offsets (:func:`~llmserve.quantization.packed.set_weight_only`, a Triton kernel): 4-bit
codes when every row's are (6 bits a weight with the float32 scale and offset per 32 columns), else a byte per
code, in groups of the narrowest group any row has (a Q4_K_M file's fused qkv with Q6_K rows: 16 columns).
Layers the file holds in float (F32/F16/BF16, or a fused layer with a float projection), the embedding (a
lookup) and every architecture outside :data:`PACKED_ARCHITECTURES` load dequantised as before.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from llmserve.layers.embedding import ParallelLMHead
from llmserve.layers.fused_moe.layer import FusedMoE
from llmserve.layers.fused_moe.method import FusedMoEMethodBase
from llmserve.layers.linear import LinearBase, WeightShapeError
from llmserve.quantization.base import QuantizationConfig, QuantizeMethodBase, set_weight_attrs
from llmserve.quantization.checkpoint_moe import method_for_layer
from llmserve.quantization.checkpoint_params import drop_params
from llmserve.quantization.gguf_blocks import PACKED_TYPES, GroupCodes, decode_rows, row_bytes
from llmserve.quantization.group_int8 import apply_group_int8, set_group_int8
from llmserve.quantization.layer_selection import checkpoint_names
from llmserve.quantization.packed import U4, U8, apply_weight_only, set_weight_only

logger = logging.getLogger(__name__)

# llama.cpp architectures whose packed rows load into llmserve's layers: named as transformers names the tensors
# (deepseek2, gemma4: as their own maps in model_loader name them; phi3's fused qkv_proj / gate_up_proj as its fused
# layers; gpt2, bloom, falcon: through the model's checkpoint_name) and only reordered by row (the Q/K permutation,
# BLOOM's and Falcon's regrouped qkv) or transposed whole (GPT-2's Conv1D, which the model transposes back).
PACKED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "deepseek2", "gemma4", "phi3", "command-r",
                         "cohere2", "gemma2", "gemma3", "bloom", "falcon", "gpt2")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Bytes per 32 columns of the widest packed type (Q8_0): the width of a layer's loading buffer.
_WIDEST_BLOCK = 34


def _type_name(type_id: int) -> str:
    from llmserve.model_loader.gguf_loader import import_gguf

    return import_gguf().GGMLQuantizationType(type_id).name


class GGUFConfig(QuantizationConfig):
    """``packed_weights``: the file's tensors (by Hugging Face name, ``...q_proj.weight``; kept under the model's
    names) in a packed type, with that type. A layer runs packed when all its projections are; :meth:`packs` then
    tells the loader which tensors to hand over as blocks. ``rename``: the model's name for a Hugging Face one, for
    a family whose checkpoints name its layers otherwise (BLOOM's ``self_attention.query_key_value`` is its
    ``self_attn.qkv_proj``)."""

    def __init__(self, packed_weights: dict[str, str], packed_experts: dict[int, set[str]] | None = None,
                 rename: Callable[[str], str] | None = None) -> None:
        self._rename = rename or (lambda name: name)
        self.packed_weights = {self._rename(name): t for name, t in packed_weights.items()}
        self.packed_experts = dict(packed_experts or {})   # layer -> its stacked experts' types, all packed
        self._packed_modules: set[str] = set()
        self._packed_expert_layers: set[int] = set()

    def get_name(self) -> str:
        return "gguf"

    def __repr__(self) -> str:
        """The packed weights (those of the layers that took them, once the model is built) by type."""
        built = bool(self._packed_modules or self._packed_expert_layers)
        counts = Counter(t for name, t in self.packed_weights.items()
                         if not built or name.removesuffix(".weight") in self._packed_modules)
        layers = {layer: t for layer, t in self.packed_experts.items()
                  if not built or layer in self._packed_expert_layers}
        experts = (f"; the experts of {len(layers)} layers ({', '.join(sorted(set().union(*layers.values())))})"
                   if layers else "")
        return (f"gguf (weights kept packed: {', '.join(f'{n} x {t}' for t, n in sorted(counts.items()))}{experts}; "
                f"on CPU int8 activations per 32 columns)")

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | FusedMoEMethodBase | None:
        if isinstance(layer, FusedMoE):   # each expert's projections as a dense layer's, from its own rows
            index = _LAYER.match(prefix)
            if index is None or int(index[1]) not in self.packed_experts:
                return None
            self._packed_expert_layers.add(int(index[1]))
            return method_for_layer(layer, GGUFLinearMethod())
        if not isinstance(layer, (LinearBase, ParallelLMHead)):
            return None
        modules = [prefix] if f"{prefix}.weight" in self.packed_weights else checkpoint_names(prefix)
        if not all(f"{m}.weight" in self.packed_weights for m in modules):
            return None
        self._packed_modules.update(modules)
        return GGUFLinearMethod()

    def packs(self, weight_name: str) -> bool:
        """Whether the tensor ``weight_name`` (Hugging Face name) loads as packed blocks into its layer."""
        from llmserve.model_loader.gguf_experts import expert_layer

        module, _, leaf = self._rename(weight_name).rpartition(".")
        return leaf == "weight" and (module in self._packed_modules
                                     or expert_layer(weight_name) in self._packed_expert_layers)


def gguf_quantization_config(weight_types: dict[str, str], architecture: str,
                             expert_types: dict[int, set[str]] | None = None,
                             rename: Callable[[str], str] | None = None) -> GGUFConfig | None:
    """The packing of a GGUF file of ``architecture`` whose 2-D tensors have ``weight_types`` (Hugging Face
    name -> GGUF type name) and whose layers' stacked experts have ``expert_types`` (layer -> the types of its
    three stacks: packed when all are); None (logged) when nothing in it runs packed. ``rename``: as
    :class:`GGUFConfig` takes it."""
    packed = {name: t for name, t in weight_types.items() if t in PACKED_TYPES}
    experts = {layer: types for layer, types in (expert_types or {}).items() if types <= set(PACKED_TYPES)}
    if architecture not in PACKED_ARCHITECTURES or not (packed or experts):
        logger.info("GGUF %s file: weights dequantised at load (packed types run for the %s architectures)",
                    architecture, ", ".join(PACKED_ARCHITECTURES))
        return None
    return GGUFConfig(packed, experts, rename)


class GGUFLinearMethod(QuantizeMethodBase):
    """Loads rows of GGUF blocks per projection, then keeps them as group-int8 segments (CPU) or in the weight-only
    layout with offsets (CUDA)."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        k, n = input_size_per_partition, sum(output_partition_sizes)
        if k % 32:
            raise WeightShapeError(f"{layer.prefix}: GGUF blocks span 32 columns; {k} inputs do not split into them")
        # The blocks are decoded on the host after loading, so they are loaded there whatever the model's device
        # (on a GPU they would take about a byte a weight of its memory until then, then be copied back).
        layer.gguf_device = torch.empty(0).device   # the device the model is being built on
        qweight = nn.Parameter(torch.zeros(n, k // 32 * _WIDEST_BLOCK, dtype=torch.uint8, device="cpu"),
                               requires_grad=False)
        qtype = nn.Parameter(torch.zeros(n, dtype=torch.uint8, device="cpu"), requires_grad=False)

        def rows_of(shard_id: object) -> tuple[int, int]:
            if shard_id is None:
                return 0, n
            index = layer._shard_index(shard_id)
            return sum(output_partition_sizes[:index]), output_partition_sizes[index]

        def load_type(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            start, rows = rows_of(shard_id)
            if loaded.shape != (rows,):
                raise WeightShapeError(f"{layer.prefix}.qweight_type: {tuple(loaded.shape)} for {rows} rows")
            param.data[start:start + rows] = loaded

        def load_blocks(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            start, rows = rows_of(shard_id)
            types = {_type_name(int(t)) for t in qtype.data[start:start + rows].unique()}
            if len(types) != 1 or types & {"F32"} or loaded.shape != (rows, row_bytes(types.pop(), k)):
                raise WeightShapeError(f"{layer.prefix}.qweight: {tuple(loaded.shape)} is not {rows} rows of {k} "
                                       f"columns in the type loaded for them")
            param.data[start:start + rows, :loaded.shape[1]] = loaded

        set_weight_attrs(qweight, {"weight_loader": load_blocks})
        set_weight_attrs(qtype, {"weight_loader": load_type})
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qweight_type", qtype)
        layer.gguf_in = k

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        device = layer.gguf_device
        raw, types, k = layer.qweight.data.numpy(), layer.qweight_type.data.numpy(), layer.gguf_in
        runs, start = [], 0
        for type_id, rows in ((t, len(list(g))) for t, g in itertools.groupby(types.tolist())):
            name = _type_name(type_id)
            runs.append(decode_rows(raw[start:start + rows, :row_bytes(name, k)], name, k))
            start += rows
        drop_params(layer, "qweight", "qweight_type")
        layer.gguf_weight_only = device.type != "cpu"
        if layer.gguf_weight_only:
            set_gguf_weight_only(layer, runs, device)
        else:
            set_group_int8(layer, [_concatenated(list(g)) for _, g in itertools.groupby(runs, key=_layout)])

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.gguf_weight_only:
            return apply_weight_only(layer, x, bias)
        return apply_group_int8(layer, x, bias)


def set_gguf_weight_only(layer: nn.Module, runs: list[GroupCodes], device: torch.device) -> None:
    """The layer's row runs (in output order) as one weight-only layout, ``W = s * code + o``: 4-bit codes when
    every run's fit, else a byte each; groups of the narrowest run's width, a wider run's scale and offset
    repeated (16 divides 32). Every value is the one the file's blocks dequantise to."""
    group = min(r.group for r in runs)
    code_format = U4 if all(r.bits == 4 for r in runs) else U8

    def per_group(values: np.ndarray, run: GroupCodes) -> np.ndarray:
        return np.repeat(values, run.group // group, axis=1)

    codes = torch.from_numpy(np.concatenate([r.codes for r in runs]))
    scales = torch.from_numpy(np.concatenate([per_group(r.scales, r) for r in runs]))
    offsets = torch.from_numpy(np.concatenate([per_group(r.offsets, r) for r in runs]))
    set_weight_only(layer, codes.to(device), code_format, scales.to(device), None, group,
                    offsets=offsets.to(device))


def _layout(codes: GroupCodes) -> tuple:
    """What row runs must share to be one segment (Q5_0 and Q8_0 rows do; Q4_0 and Q4_K rows do not)."""
    return (codes.bits, codes.group, codes.per_block, codes.sc is None, codes.mins is None,
            None if codes.m is not None else codes.zero)


def _concatenated(runs: list[GroupCodes]) -> GroupCodes:
    """Row runs of one layout as one segment (a signed format's zero point: the first run's; equal by layout)."""
    if len(runs) == 1:
        return runs[0]

    def joined(field: str) -> np.ndarray | None:
        parts = [getattr(r, field) for r in runs]
        return None if parts[0] is None else np.concatenate(parts)

    first = runs[0]
    return GroupCodes(joined("codes"), joined("d"), joined("sc"), joined("m"), joined("mins"), first.zero, first.bits,
                      first.group, first.per_block)

