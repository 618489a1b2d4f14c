"""Checkpoint-quantised experts (GPTQ, AWQ, compressed-tensors) of a fused mixture-of-experts layer.

A quantised MoE checkpoint stores each expert's projections as its format stores a dense linear layer
(``experts.{e}.gate_proj.qweight``, ``.scales``, ``.g_idx``...; Mixtral's ``w1``/``w3``/``w2``). So the format's
own linear method reads, repacks and multiplies each of them: :class:`CheckpointFusedMoEMethod` gives every
expert an :class:`ExpertProjection` for its gate and up projections (fused, as ``gate_up_proj`` is) and one for
its down projection, and has the linear method create their checkpoint parameters. Those are views into
parameters stacked over the layer's experts (``w13_qweight`` [E, ...], ``w2_scales`` [E, ...]): what the model's
loader fills, one expert and projection at a time, through the linear method's own loaders (so a shape or a
``g_idx`` that differs between gate and up is caught as it is for a dense layer).

After loading, the linear method repacks each expert into its packed layout (codes, scales, zeros and column
order per expert: :mod:`llmserve.quantization.packed`), the stacked checkpoint tensors are dropped, and the
experts run grouped by expert (:func:`~llmserve.layers.fused_moe.grouped_experts.grouped_expert_modules`) through
the linear method's ``apply``: the kernels the dense layers use, one call per expert that received tokens.

Sharding: with expert parallelism an expert is held whole by one rank, so nothing is split. With tensor
parallelism every rank holds every expert split over its intermediate dimension, as the float experts are: an
expert's gate and up projections are column-parallel (this rank's rows of each) and its down projection
row-parallel (this rank's columns), so the linear method's loaders narrow them as they narrow a dense layer's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmserve.layers.fused_moe.grouped_experts import grouped_expert_modules
from llmserve.layers.fused_moe.layer import FusedMoE
from llmserve.layers.fused_moe.method import FusedMoEMethodBase
from llmserve.layers.linear import LinearBase
from llmserve.quantization.base import QuantizeMethodBase, set_weight_attrs

QUANTISABLE_LAYERS = (LinearBase, FusedMoE)   # what a checkpoint format's config gives a method to


class ExpertProjection(nn.Module):
    """One expert's gate and up projections (``shard_ids`` ``("w1", "w3")``) or its down projection (``("w2",)``),
    with the sizes, shard lookup and tensor-parallel placement a linear method reads of the layer it serves.

    ``input_size``/``output_sizes``: the unsharded sizes (the checkpoint's); the ``*_per_partition`` ones: this
    rank's (smaller along the intermediate dimension under tensor parallelism).
    """

    def __init__(self, prefix: str, input_size: int, input_size_per_partition: int, output_sizes: list[int],
                 output_partition_sizes: list[int], shard_ids: tuple[str, ...], tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.prefix, self.shard_ids, self.tp_rank, self.tp_size = prefix, shard_ids, tp_rank, tp_size
        self.input_size, self.input_size_per_partition = input_size, input_size_per_partition
        self.checkpoint_sizes = list(output_sizes)
        self.output_partition_sizes = list(output_partition_sizes)
        self.output_size_per_partition = sum(output_partition_sizes)

    def _shard_index(self, shard_id: object) -> int:
        if shard_id not in self.shard_ids:
            raise ValueError(f"{self.prefix}: unknown projection {shard_id!r}; this one takes {list(self.shard_ids)}")
        return self.shard_ids.index(shard_id)

    def _shard_start(self, index: int) -> int:
        rows = self.output_partition_sizes[index]
        return 0 if rows == self.checkpoint_sizes[index] else self.tp_rank * rows

    @property
    def input_shard_start(self) -> int:
        return self.tp_rank * self.input_size_per_partition


def method_for_layer(layer: nn.Module, linear_method: QuantizeMethodBase) -> QuantizeMethodBase | FusedMoEMethodBase:
    """``linear_method`` for a linear layer; for a fused MoE layer, the same method on each of its experts."""
    return CheckpointFusedMoEMethod(linear_method) if isinstance(layer, FusedMoE) else linear_method


class CheckpointFusedMoEMethod(FusedMoEMethodBase):
    """A checkpoint format's linear method applied to each expert's ``w13`` (gate, up) and ``w2`` (down)."""

    def __init__(self, linear_method: QuantizeMethodBase) -> None:
        self.linear_method = linear_method

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.linear_method).__name__})"

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        inter, full = intermediate_size_per_partition, layer.intermediate_size
        shapes = {"w13": ((hidden_size, hidden_size), ([full, full], [inter, inter]), ("w1", "w3"), "gate_up_proj"),
                  "w2": ((full, inter), ([hidden_size], [hidden_size]), ("w2",), "down_proj")}
        # A plain dict, not submodules: until they are repacked, the experts' parameters are the stacked ones.
        layer.loading_experts = {}
        for name, ((inputs, rank_inputs), (outputs, rank_outputs), shard_ids, label) in shapes.items():
            experts = [ExpertProjection(f"{layer.prefix}.{layer.expert_start + e}.{label}", inputs, rank_inputs,
                                        outputs, rank_outputs, shard_ids, layer.tp_rank, layer.tp_size)
                       for e in range(num_experts)]
            for expert in experts:
                self.linear_method.create_weights(expert, rank_inputs, rank_outputs, inputs, sum(outputs),
                                                  params_dtype)
            for param_name in list(experts[0]._parameters):
                stacked = nn.Parameter(torch.stack([e._parameters[param_name].data for e in experts]),
                                       requires_grad=False)
                for index, expert in enumerate(experts):
                    expert._parameters[param_name].data = stacked.data[index]
                set_weight_attrs(stacked, {"weight_loader": self._loader(layer, experts, param_name)})
                layer.register_parameter(f"{name}_{param_name}", stacked)
            layer.loading_experts[name] = experts

    @staticmethod
    def _loader(layer: nn.Module, experts: list[ExpertProjection],
                param_name: str) -> Callable[[nn.Parameter, torch.Tensor, object], None]:
        def load(stacked: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            """One expert's tensor (``shard_id=(expert, "w1" | "w3" | "w2")``) into that expert's slice, by the
            linear method's own loader; an expert another expert-parallel rank holds is skipped."""
            if shard_id is None:
                raise ValueError(f"{layer.prefix}: quantised experts load one expert's tensor at a time "
                                 f"(experts.<e>.<projection>.{param_name}), not a tensor of every expert")
            expert, projection = shard_id
            if not 0 <= expert < layer.num_experts:
                raise ValueError(f"{layer.prefix}: expert {expert} is outside the layer's {layer.num_experts} experts")
            local = expert - layer.expert_start
            if 0 <= local < layer.num_local_experts:
                param = experts[local]._parameters[param_name]
                param.weight_loader(param, loaded, projection)
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        for name, experts in layer.__dict__.pop("loading_experts").items():
            for expert in experts:
                self.linear_method.process_weights_after_loading(expert)
            for param_name in [p for p in layer._parameters if p.startswith(f"{name}_")]:
                del layer._parameters[param_name]
            layer.add_module(f"{name}_experts", nn.ModuleList(experts))

    def apply(self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return grouped_expert_modules(x, layer.w13_experts, layer.w2_experts, topk_weights, topk_ids, activation,
                                      self.linear_method.apply)
