"""compressed-tensors checkpoints (``quant_method: compressed-tensors``), as llm-compressor saves them.

``config_groups`` map ``targets`` (``Linear``, module names, ``re:`` patterns) to a scheme; ``ignore`` lists
modules left in float. The schemes llmserve runs:

* **W8A8 int8** (``int-quantized``): ``weight`` int8 ``[out, in]``, ``weight_scale`` per channel ``[out, 1]``
  (or per tensor), activations quantised per token on the fly (dynamic, symmetric);
* **W4A16 / W8A16** (``pack-quantized``): ``weight_packed`` int32 ``[out, in / 8]`` (signed codes offset by
  ``2^(bits-1)``, packed along the input dim, lowest bits first), ``weight_scale`` ``[out, groups]`` (group or
  channel strategy), ``weight_shape``; symmetric;
* **FP8** (``float-quantized``): ``weight`` float8 e4m3 with a per-channel or per-tensor ``weight_scale``;
  activations quantised to float8 per token (dynamic) or with the checkpoint's ``input_scale`` (static),
  or left in float (weight-only FP8).

Any other scheme is refused, naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmserve.layers.fused_moe.method import FusedMoEMethodBase
from llmserve.quantization.base import QuantizationConfig, QuantizeMethodBase
from llmserve.quantization.checkpoint_moe import QUANTISABLE_LAYERS, method_for_layer
from llmserve.quantization.checkpoint_params import (CheckpointFormatError, add_checkpoint_param, add_shape_param,
                                                     add_shard_scalar_param, check_input_split, drop_params,
                                                     per_output, unpack_int32)
from llmserve.quantization.layer_selection import covers_all, matches_any
from llmserve.quantization.packed import CHUNK, FP8, U4, U8, apply_w8a8, apply_weight_only, set_w8a8, set_weight_only

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def describe_args(args: dict[str, Any] | None) -> str:
    """One side of a scheme (weights, activations, the KV cache) as a few words, for errors and logs."""
    if not args:
        return "none"
    return (f"{args.get('type', 'int')}{args.get('num_bits')} {args.get('strategy')}"
            f"{' dynamic' if args.get('dynamic') else ''}{'' if args.get('symmetric', True) else ' asymmetric'}"
            f"{' group ' + str(args.get('group_size')) if args.get('strategy') == 'group' else ''}"
            f"{' actorder ' + str(args.get('actorder')) if args.get('actorder') else ''}")


def describe(scheme: dict[str, Any], fmt: str | None) -> str:
    """A scheme as one line, for errors and logs."""
    return (f"weights {describe_args(scheme.get('weights'))}, activations "
            f"{describe_args(scheme.get('input_activations'))}, format {fmt}")


def method_for(scheme: dict[str, Any], fmt: str | None) -> QuantizeMethodBase:
    """The method that runs ``scheme`` stored in ``fmt``, or :class:`CheckpointFormatError` naming it."""
    weights, acts = scheme.get("weights") or {}, scheme.get("input_activations")
    w_type, bits, strategy = weights.get("type", "int"), weights.get("num_bits"), weights.get("strategy")
    symmetric = weights.get("symmetric", True) and (acts is None or acts.get("symmetric", True))
    group_size = weights.get("group_size") or 0
    # group act-order ("group", or "dynamic" as older versions call it) stores a weight_g_idx llmserve does not read
    in_order = weights.get("actorder") in (None, False, "weight", "static")
    if symmetric and in_order and not weights.get("dynamic") and not scheme.get("output_activations"):
        if (fmt == "int-quantized" and w_type == "int" and bits == 8 and strategy in ("channel", "tensor")
                and acts and acts.get("type", "int") == "int" and acts.get("num_bits") == 8
                and acts.get("dynamic") and acts.get("strategy") == "token"):
            return CTW8A8Method(strategy)
        if (fmt == "pack-quantized" and w_type == "int" and bits in (4, 8) and acts is None
                and (strategy == "channel" or (strategy == "group" and group_size % CHUNK == 0 and group_size > 0))):
            return CTPackedMethod(bits, group_size if strategy == "group" else -1)
        if (fmt == "float-quantized" and w_type == "float" and bits == 8 and strategy in ("channel", "tensor")
                and (acts is None or (acts.get("type") == "float" and acts.get("num_bits") == 8 and (
                    (acts.get("dynamic") and acts.get("strategy") == "token")
                    or (not acts.get("dynamic") and acts.get("strategy") == "tensor"))))):
            return CTFP8Method(strategy, None if acts is None else ("dynamic" if acts.get("dynamic") else "static"))
    raise CheckpointFormatError(f"compressed-tensors scheme ({describe(scheme, fmt)}) is not supported; llmserve "
                                f"runs int8 W8A8 (channel/tensor weights, dynamic per-token activations), "
                                f"W4A16/W8A16 pack-quantized (symmetric, channel or groups of a multiple of {CHUNK}, "
                                f"no group act-order) "
                                f"and FP8 (channel/tensor weights; dynamic per-token, static or no activation quant)")


def check_kv_cache_scheme(scheme: dict[str, Any] | None) -> None:
    """Accept the KV-cache scheme llm-compressor writes with calibrated ``self_attn.k_scale`` / ``v_scale`` (8-bit
    float, one static scale per tensor): the scales are read and used with ``--kv-cache-dtype fp8`` (see
    :mod:`llmserve.quantization.kv_cache`); refuse any other, naming it."""
    if not scheme:
        return
    if (scheme.get("type") == "float" and scheme.get("num_bits") == 8 and scheme.get("strategy") == "tensor"
            and not scheme.get("dynamic") and scheme.get("symmetric", True)):
        return
    raise CheckpointFormatError(f"compressed-tensors kv_cache_scheme ({describe_args(scheme)}) is not "
                                f"supported; llmserve reads 8-bit float per-tensor static k/v scales")


class CompressedTensorsConfig(QuantizationConfig):
    """The ``config_groups`` (targets -> scheme), their storage ``format`` and the ``ignore`` list."""

    def __init__(self, groups: list[tuple[list[str], dict[str, Any], str | None]], ignore: list[str]) -> None:
        self.groups, self.ignore = groups, ignore
        for _, scheme, fmt in groups:
            method_for(scheme, fmt)   # refuse an unsupported scheme at start-up, not at the first layer

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        status = config.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise CheckpointFormatError(f"compressed-tensors checkpoint in status {status!r} is not supported")
        check_kv_cache_scheme(config.get("kv_cache_scheme"))
        groups = [(list(g.get("targets") or []), g, g.get("format") or config.get("format"))
                  for g in (config.get("config_groups") or {}).values()]
        if not groups:
            raise CheckpointFormatError("compressed-tensors quantization_config has no config_groups")
        return cls(groups, list(config.get("ignore") or []))

    def get_name(self) -> str:
        return "compressed-tensors"

    def __repr__(self) -> str:
        return "compressed-tensors(" + "; ".join(describe(s, f) for _, s, f in self.groups) + ")"

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | FusedMoEMethodBase | None:
        if not isinstance(layer, QUANTISABLE_LAYERS) or covers_all(prefix, matches_any(self.ignore)):
            return None
        # A group that names the layer (its name or a re: pattern) wins over one that targets every Linear, as
        # in compressed-tensors itself, whatever the groups' order; experts are Linear modules in the checkpoint.
        for targets, scheme, fmt in self.groups:
            names = [t for t in targets if t != "Linear"]
            if names and covers_all(prefix, matches_any(names)):
                return method_for_layer(layer, method_for(scheme, fmt))
        for targets, scheme, fmt in self.groups:
            if "Linear" in targets:
                return method_for_layer(layer, method_for(scheme, fmt))
        return None


class CTW8A8Method(QuantizeMethodBase):
    """int8 weights with per-channel (or per-projection) scales; int8 activations per token."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        n = sum(output_partition_sizes)
        add_checkpoint_param(layer, "weight", (n, input_size_per_partition), torch.int8, output_dim=0, input_dim=1)
        if self.strategy == "channel":
            add_checkpoint_param(layer, "weight_scale", (n, 1), torch.float32, output_dim=0)
        else:
            add_shard_scalar_param(layer, "weight_scale")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale = layer.weight_scale.data
        per_row = scale.reshape(-1) if self.strategy == "channel" else per_output(layer, scale)
        set_w8a8(layer, layer.weight.data, per_row)
        drop_params(layer, "weight", "weight_scale")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_w8a8(layer, x, bias)


class CTPackedMethod(QuantizeMethodBase):
    """Symmetric 4- or 8-bit codes packed in int32 along the input dim, per-group or per-channel scales."""

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits, self.group_size = bits, group_size

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        k, n, pack = input_size_per_partition, sum(output_partition_sizes), 32 // self.bits
        check_input_split(layer, "compressed-tensors", self.group_size, pack)
        groups, group_dim = (1, None) if self.group_size == -1 else (-(-k // self.group_size), 1)
        add_checkpoint_param(layer, "weight_packed", (n, -(-k // pack)), torch.int32, output_dim=0, input_dim=1,
                             input_pack=pack)
        add_checkpoint_param(layer, "weight_scale", (n, groups), torch.float32, output_dim=0, input_dim=group_dim,
                             input_pack=self.group_size)
        add_shape_param(layer, "weight_shape")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        k = layer.input_size_per_partition
        codes = unpack_int32(layer.weight_packed.data, self.bits, dim=1)[:, :k]
        offset = 1 << (self.bits - 1)
        zeros = torch.full_like(layer.weight_scale.data, float(offset))
        set_weight_only(layer, codes, U4 if self.bits == 4 else U8, layer.weight_scale.data, zeros,
                        k if self.group_size == -1 else self.group_size)
        drop_params(layer, "weight_packed", "weight_scale", "weight_shape")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_weight_only(layer, x, bias)


def quantize_fp8_activations(x: torch.Tensor, static_scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` rounded through float8 e4m3 as an FP8 matmul sees it: per row with ``max|x| / 448`` (dynamic), or
    with the checkpoint's scale (static, clamped to the float8 range)."""
    if static_scale is None:
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    else:
        scale = static_scale
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


class CTFP8Method(QuantizeMethodBase):
    """float8 e4m3 weights (per-channel or per-projection scales) kept as bytes; activations through float8."""

    def __init__(self, strategy: str, activations: str | None) -> None:
        self.strategy, self.activations = strategy, activations

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        n = sum(output_partition_sizes)
        add_checkpoint_param(layer, "weight", (n, input_size_per_partition), torch.float8_e4m3fn, output_dim=0,
                             input_dim=1)
        if self.strategy == "channel":
            add_checkpoint_param(layer, "weight_scale", (n, 1), torch.float32, output_dim=0)
        else:
            add_shard_scalar_param(layer, "weight_scale")
        if self.activations == "static":
            add_shard_scalar_param(layer, "input_scale")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale = layer.weight_scale.data
        scale = scale.reshape(-1, 1) if self.strategy == "channel" else per_output(layer, scale).reshape(-1, 1)
        k = layer.input_size_per_partition
        set_weight_only(layer, layer.weight.data, FP8, scale, None, k)
        # One input scale for the fused projections: the largest, so no projection's inputs clip (vLLM's rule).
        layer.fp8_input_scale = layer.input_scale.data.max() if self.activations == "static" else None
        drop_params(layer, "weight", "weight_scale", "input_scale")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.activations is not None:
            x = quantize_fp8_activations(x, layer.fp8_input_scale)
        return apply_weight_only(layer, x, bias)
