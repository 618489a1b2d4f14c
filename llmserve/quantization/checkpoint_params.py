"""Parameters in a quantised checkpoint's own layout, loaded shard by shard into fused layers.

Quantised formats store tensors whose output dimension is not dim 0 (GPTQ's ``qweight`` is
``[in / 8, out]``) or is packed (``qzeros`` holds 8 outputs per int32), so the layers' row-narrowing
loaders do not fit them. Each such parameter declares which dim holds the outputs and how many outputs
one element packs; its loader copies a fused layer's shard (``q``/``k``/``v``, gate/up) into its slice
along that dim. A parameter without an output dim (``g_idx``) must be the same for every shard.
The method turns them into the packed kernel layout after loading (:mod:`llmserve.quantization.packed`).

Tensor parallelism (vLLM's placement): the loaders take the unsharded checkpoint tensor and keep this rank's
part, asking the layer where it starts: a column-parallel layer's rows of each projection (``_shard_start``,
with QKV's per-rank head counts and replicated KV heads) along the output dim, in packed units; a
row-parallel layer's columns (``input_shard_start``) along the input dim, in units of codes per int32 or of
groups. :func:`check_input_split` refuses, at start-up, a split that would cut a group or a packed word.
"""

from __future__ import annotations

import torch
from torch import nn

from llmserve.layers.linear import WeightShapeError, check_shape, copy_checked
from llmserve.quantization.base import set_weight_attrs


class CheckpointFormatError(ValueError):
    """A quantised checkpoint's config or tensors do not describe a layout llmserve can run."""


def check_dtype(loaded: torch.Tensor, dtype: torch.dtype, label: str, index: bool = False) -> None:
    """Refuse a checkpoint tensor not stored in its format's dtype: codes and int8 / float8 weights in exactly
    theirs (an ``index`` such as ``g_idx``: any integer type), scales in any float type. A cast would turn a
    dequantised float tensor into codes, or scale float8 values twice, without a word."""
    if dtype.is_floating_point and dtype.itemsize > 1:
        stored = loaded.dtype.is_floating_point
    elif index:
        stored = not (loaded.dtype.is_floating_point or loaded.dtype.is_complex or loaded.dtype == torch.bool)
    else:
        stored = loaded.dtype == dtype
    if not stored:
        expected = ("a float type" if dtype.is_floating_point and dtype.itemsize > 1
                    else "an integer type" if index else str(dtype))
        raise CheckpointFormatError(f"{label} is stored as {loaded.dtype}; the checkpoint's format stores it as "
                                    f"{expected}")


def check_input_split(layer: nn.Module, format_name: str, group_size: int, pack: int = 1) -> None:
    """On a layer whose inputs are split over tensor-parallel ranks (row-parallel, an expert's down projection),
    refuse at start-up unless each rank's columns hold whole groups and whole packed words: a group split
    between ranks would need its scale on both, a word split between them would need unpacking before sharding."""
    k, total = layer.input_size_per_partition, layer.input_size
    if k == total:
        return
    for what, size in (("group size", group_size), ("codes per int32", pack)):
        if size > 1 and k % size:
            raise CheckpointFormatError(
                f"{layer.prefix}: its {total} inputs split over {total // k} tensor-parallel ranks leave {k} per "
                f"rank, not a multiple of the {format_name} {what} ({size}); use a smaller --tensor-parallel-size")


def add_checkpoint_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                         output_dim: int | None, pack_factor: int = 1, input_dim: int | None = None,
                         input_pack: int = 1) -> nn.Parameter:
    """Register ``layer.<name>`` (this rank's ``shape``) with a loader that takes the checkpoint's unsharded
    tensor and keeps this rank's part of it.

    ``output_dim``: the dim holding the outputs, ``pack_factor`` of them per element; each fused shard's rows
    this rank holds are placed along it (None: a tensor every shard brings the same, e.g. ``g_idx``).
    ``input_dim``: the dim holding the inputs, ``input_pack`` of them per element (codes per int32, or the group
    size for per-group scales), narrowed to this rank's columns on a layer whose inputs are split (None: every
    rank keeps it whole, e.g. the scales of one group, or those GPTQ's ``g_idx`` indexes).
    """
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)

    def checkpoint_shape(rows: int | None) -> list[int]:
        full = list(shape)
        if input_dim is not None:
            full[input_dim] = -(-layer.input_size // input_pack)
        if rows is not None:
            full[output_dim] = rows // pack_factor
        return full

    def own_columns(loaded: torch.Tensor) -> torch.Tensor:
        if input_dim is None or layer.input_size_per_partition == layer.input_size:
            return loaded
        return loaded.narrow(input_dim, layer.input_shard_start // input_pack, shape[input_dim])

    def place(target: nn.Parameter, loaded: torch.Tensor, shard_id: object, label: str) -> None:
        index = layer._shard_index(shard_id)
        start, rows = sum(layer.output_partition_sizes[:index]), layer.output_partition_sizes[index]
        first = layer._shard_start(index)
        if start % pack_factor or rows % pack_factor or first % pack_factor:
            raise WeightShapeError(f"{label}: projection of {rows} outputs does not split into packs of {pack_factor}")
        check_shape(loaded, checkpoint_shape(layer.checkpoint_sizes[index]), label)
        copy_checked(target.data.narrow(output_dim, start // pack_factor, rows // pack_factor),
                     own_columns(loaded).narrow(output_dim, first // pack_factor, rows // pack_factor), label)

    def load(target: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        label = getattr(target, "checkpoint_name", "") or f"{layer.prefix}.{name}"
        check_dtype(loaded, dtype, label, index=output_dim is None)
        if output_dim is None:
            check_shape(loaded, checkpoint_shape(None), label)
            loaded = own_columns(loaded)
            if shard_id is not None and getattr(target, "loaded_once", False) and not torch.equal(
                    target.data, loaded.to(target.dtype)):
                raise WeightShapeError(f"{label} differs between the fused projections of {layer.prefix}")
            copy_checked(target, loaded, label)
            target.loaded_once = shard_id is not None
            return
        if shard_id is None and len(layer.shard_ids) > 1:   # a fused checkpoint tensor: each projection in turn
            check_shape(loaded, checkpoint_shape(sum(layer.checkpoint_sizes)), label)
            parts = loaded.split([rows // pack_factor for rows in layer.checkpoint_sizes], dim=output_dim)
            for sid, part in zip(layer.shard_ids, parts):
                place(target, part, sid, label)
            return
        place(target, loaded, shard_id, label)

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
        check_dtype(loaded, torch.float32, label)
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
    """Register ``layer.<name>``, a checkpoint's record of a weight's unsharded ``[out, in]`` shape, checked against
    each projection as it loads (nothing to keep: the layer knows its shapes)."""
    param = nn.Parameter(torch.zeros(len(layer.output_partition_sizes), 2, dtype=torch.int64), requires_grad=False)

    def load(target: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        fused = shard_id is None and len(layer.shard_ids) > 1
        rows = sum(layer.checkpoint_sizes) if fused else layer.checkpoint_sizes[layer._shard_index(shard_id)]
        if loaded.tolist() != [rows, layer.input_size]:
            label = getattr(target, "checkpoint_name", "") or f"{layer.prefix}.{name}"
            raise WeightShapeError(f"{label} records shape {loaded.tolist()} but the model expects "
                                   f"{[rows, layer.input_size]} (unsharded)")

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
