"""LoRA on the linear layers, through their quantisation-method seam.

:class:`LoRALinearMethod` wraps a layer's own method: the base matmul runs as before (any format), then the
step's adapters add their deltas (:func:`~llmserve.lora.punica.add_lora`). Each wrapped layer holds
preallocated stacked buffers (a :class:`~llmserve.lora.punica.LoRAStack`) for its S fused projections
(q/k/v, gate/up) and ``R = --max-lora-rank``: A ``[max_loras, S*R, in]``, each projection's rows one after
another, so one shrink covers the fused layer; B ``[max_loras, out, R]``, each projection's B on its own
output rows, so each projection's expand does only its own work.

Tensor parallelism follows the base layer's sharding: a column-parallel layer keeps its rows of B (per
projection, as its weight loader does); a row-parallel layer keeps its columns of A, and because the
expand is linear, each rank's partial delta is summed by the layer's own all-reduce. On a GPU with Triton
the ops are :mod:`llmserve.lora.triton_ops`' segmented kernels.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmserve.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    RowParallelLinear,
    check_shape,
)
from llmserve.lora.cpu_ops import DTYPES as CPU_KERNEL_DTYPES
from llmserve.lora.cpu_ops import CPULoRALayer, cpu_kernel_runs
from llmserve.lora.peft import LoRAModuleWeights
from llmserve.lora.punica import LoRABatchMapping, add_lora, new_stack
from llmserve.quantization.base import QuantizeMethodBase


@dataclass
class ShardGeometry:
    """Where one fused projection sits: its rows in this rank's output and in the checkpoint tensor."""

    shard_id: object
    out_offset: int        # first row in this rank's output
    rows: int              # rows this rank holds
    checkpoint_start: int  # first checkpoint row this rank holds
    checkpoint_rows: int   # rows of the whole (unsharded) projection


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class LoRABatchState:
    """The step's adapter mapping, shared by every wrapped layer (set by the model runner's LoRA manager)."""

    def __init__(self) -> None:
        self.mapping = LoRABatchMapping()


def shard_geometry(layer: LinearBase) -> list[ShardGeometry]:
    if isinstance(layer, MergedColumnParallelLinear):
        offsets = [sum(layer.output_partition_sizes[:i]) for i in range(len(layer.shard_ids))]
        return [ShardGeometry(sid, offsets[i], layer.output_partition_sizes[i], layer._shard_start(i),
                              layer.checkpoint_sizes[i]) for i, sid in enumerate(layer.shard_ids)]
    rows = layer.output_size_per_partition
    start = layer.tp_rank * rows if isinstance(layer, ColumnParallelLinear) else 0
    return [ShardGeometry(None, 0, rows, start, layer.output_size)]


class LoRALinearMethod(QuantizeMethodBase):
    """A layer's method plus ``max_loras`` adapter slots."""

    def __init__(self, layer: LinearBase, base: QuantizeMethodBase, state: LoRABatchState, max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.base = base
        self.state = state
        self.shards = shard_geometry(layer)
        self.input_size = layer.input_size
        cols = layer.input_size_per_partition
        sharded_input = isinstance(layer, RowParallelLinear) and layer.tp_size > 1
        self.input_start, self.input_cols = (layer.tp_rank * cols if sharded_input else 0), cols
        bounds = [s.out_offset for s in self.shards] + [layer.output_size_per_partition]
        self.stack = new_stack(max_loras, max_rank, cols, bounds, dtype, device)
        self.rank_tensor = torch.zeros(max_loras, dtype=torch.long, device=device)   # stack.ranks, for the kernels
        self.bounds_tensor = torch.tensor(bounds, dtype=torch.long, device=device)
        self.use_triton = device.type == "cuda" and triton_available()
        self.cpu_kernel = CPULoRALayer(self.stack, self.rank_tensor, self.bounds_tensor) \
            if cpu_kernel_runs(self.stack) else None

    def create_weights(self, layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        self.base.create_weights(layer, *args, **kwargs)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base.apply(layer, x, bias)
        mapping = self.state.mapping
        if mapping.segments:
            out_rows, x_rows = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
            if self.use_triton:
                from llmserve.lora.triton_ops import add_lora_segments

                add_lora_segments(out_rows, x_rows.contiguous(), self.stack, self.rank_tensor, self.bounds_tensor,
                                  mapping.device_segments(x.device))
            elif self.cpu_kernel is not None and x.dtype == out.dtype and x.dtype in CPU_KERNEL_DTYPES:
                # Every step with adapter rows, one adapter for all of them too: one parallel region per layer
                # against add_lora's one per GEMM, measured faster on two threads at every row count
                # (docs/benchmarks.md).
                self.cpu_kernel.add(out_rows, x_rows if x_rows.stride(1) == 1 else x_rows.contiguous(), mapping)
            else:
                add_lora(out_rows, x_rows, self.stack, mapping)
        return out

    def set_slot(self, slot: int, weights: dict[object, LoRAModuleWeights], name: str) -> None:
        """Write an adapter's projections of this layer (by shard id; None: the fused tensor) into ``slot``."""
        self.clear_slot(slot)
        parts = self._per_shard(weights, name)
        if not parts:
            return
        rank = max(w.rank for w in parts.values())
        for index, w in parts.items():
            shard = self.shards[index]
            check_shape(w.lora_a, (w.rank, self.input_size), f"{name}.lora_A")
            check_shape(w.lora_b, (shard.checkpoint_rows, w.rank), f"{name}.lora_B")
            self.stack.a[slot, index * rank:index * rank + w.rank] = \
                w.lora_a[:, self.input_start:self.input_start + self.input_cols]
            self.stack.b[slot, shard.out_offset:shard.out_offset + shard.rows, :w.rank] = \
                w.lora_b[shard.checkpoint_start:shard.checkpoint_start + shard.rows]
        self.stack.ranks[slot] = rank
        self.rank_tensor[slot] = rank

    def clear_slot(self, slot: int) -> None:
        self.stack.a[slot].zero_()
        self.stack.b[slot].zero_()
        self.stack.ranks[slot] = 0
        self.rank_tensor[slot] = 0

    def _per_shard(self, weights: dict[object, LoRAModuleWeights], name: str) -> dict[int, LoRAModuleWeights]:
        """The adapter's weights by shard index; a fused checkpoint tensor is split into its projections."""
        ids = [s.shard_id for s in self.shards]
        parts: dict[int, LoRAModuleWeights] = {}
        for shard_id, w in weights.items():
            if shard_id is None and len(self.shards) > 1:
                check_shape(w.lora_b, (sum(s.checkpoint_rows for s in self.shards), w.rank), f"{name}.lora_B")
                for i, b in enumerate(w.lora_b.split([s.checkpoint_rows for s in self.shards])):
                    parts[i] = LoRAModuleWeights(w.lora_a, b)
            else:
                parts[ids.index(shard_id)] = w
        return parts
