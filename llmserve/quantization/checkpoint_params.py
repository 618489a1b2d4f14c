"""Parameters in a quantised checkpoint's own layout, loaded shard by shard into fused layers.

Quantised formats store tensors whose output dimension is not dim 0 (GPTQ's ``qweight`` is
``[in / 8, out]``) or is packed (``qzeros`` holds 8 outputs per int32), so the layers' row-narrowing
loaders do not fit them. Each such parameter declares which dim holds the outputs and how many outputs
one element packs; its loader copies a fused layer's shard (``q``/``k``/``v``, gate/up) into its slice
along that dim. A parameter without an output dim (``g_idx``) must be the same for every shard.
The method turns them into the packed kernel layout after loading (:mod:`llmserve.quantization.packed`).
"""

from __future__ import annotations

import torch
from torch import nn

from llmserve.layers.linear import WeightShapeError, copy_checked
from llmserve.quantization.base import set_weight_attrs


class CheckpointFormatError(ValueError):
    """A quantised checkpoint's config or tensors do not describe a layout llmserve can run."""


def require_single_rank(layer: nn.Module, format_name: str) -> None:
    """Checkpoint-quantised layers load whole: refuse tensor parallelism clearly rather than mis-shard."""
    if getattr(layer, "tp_size", 1) > 1:
        raise CheckpointFormatError(f"{format_name} checkpoints run with --tensor-parallel-size 1 for now "
                                    f"(their packed tensors are not sharded yet)")


def add_checkpoint_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                         output_dim: int | None, pack_factor: int = 1) -> nn.Parameter:
    """Register ``layer.<name>`` (``shape``, with the outputs along ``output_dim``, ``pack_factor`` of them
    per element) with a loader that places each fused shard along that dim."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)

    def load(target: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        label = getattr(target, "checkpoint_name", "") or f"{layer.prefix}.{name}"
        if shard_id is None:
            copy_checked(target, loaded, label)
            return
        if output_dim is None:
            if getattr(target, "loaded_once", False) and not torch.equal(target.data, loaded.to(target.dtype)):
                raise WeightShapeError(f"{label} differs between the fused projections of {layer.prefix}")
            copy_checked(target, loaded, label)
            target.loaded_once = True
            return
        index = layer._shard_index(shard_id)
        start, rows = sum(layer.output_partition_sizes[:index]), layer.output_partition_sizes[index]
        if start % pack_factor or rows % pack_factor:
            raise WeightShapeError(f"{label}: projection of {rows} outputs does not split into packs of {pack_factor}")
        copy_checked(target.data.narrow(output_dim, start // pack_factor, rows // pack_factor), loaded, label)

    set_weight_attrs(param, {"weight_loader": load})
    layer.register_parameter(name, param)
    return param


def drop_params(layer: nn.Module, *names: str) -> None:
    """Free checkpoint-layout parameters once their values live in the packed layout."""
    for name in names:
        if name in layer._parameters:
            del layer._parameters[name]


def add_shard_scalar_param(layer: nn.Module, name: str) -> nn.Parameter:
    """Register ``layer.<name>``: one float per fused projection (a per-tensor scale each shard brings)."""
    param = nn.Parameter(torch.empty(len(layer.output_partition_sizes)), requires_grad=False)

    def load(target: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        label = getattr(target, "checkpoint_name", "") or f"{layer.prefix}.{name}"
        if loaded.numel() != 1:
            raise WeightShapeError(f"{label} must be one per-tensor value, got shape {tuple(loaded.shape)}")
        if shard_id is None:
            target.data.fill_(float(loaded.reshape(())))
        else:
            target.data[layer._shard_index(shard_id)] = float(loaded.reshape(()))

    set_weight_attrs(param, {"weight_loader": load})
    layer.register_parameter(name, param)
    return param


def per_output(layer: nn.Module, shard_scalars: torch.Tensor) -> torch.Tensor:
    """Per-projection scalars -> one value per output row of the fused layer."""
    return shard_scalars.repeat_interleave(torch.tensor(layer.output_partition_sizes))


def add_shape_param(layer: nn.Module, name: str) -> nn.Parameter:
    """Register ``layer.<name>``, a checkpoint's record of a weight's ``[out, in]`` shape, checked against each
    projection as it loads (nothing to keep: the layer knows its shapes)."""
    param = nn.Parameter(torch.zeros(len(layer.output_partition_sizes), 2, dtype=torch.int64), requires_grad=False)

    def load(target: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        index = None if shard_id is None else layer._shard_index(shard_id)
        rows = layer.output_size_per_partition if index is None else layer.output_partition_sizes[index]
        if loaded.tolist() != [rows, layer.input_size_per_partition]:
            label = getattr(target, "checkpoint_name", "") or f"{layer.prefix}.{name}"
            raise WeightShapeError(f"{label} records shape {loaded.tolist()} but the model expects "
                                   f"{[rows, layer.input_size_per_partition]}")

    set_weight_attrs(param, {"weight_loader": load})
    layer.register_parameter(name, param)
    return param


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Integers of ``bits`` bits packed ``32 // bits`` to an int32 along ``dim``, lowest bits first (``order``:
    the position each value packed in ``i``-th place goes to, for AWQ's interleaving) -> int32 codes."""
    pack = 32 // bits
    shifts = torch.arange(pack, dtype=torch.int32) * bits
    moved = packed.to(torch.int32).movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        values = values[..., list(order)]
    return values.reshape(*moved.shape[:-1], -1).movedim(-1, dim)
