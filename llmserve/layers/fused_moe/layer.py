"""A layer of experts stored stacked, sharded over tensor parallelism, filled from per-expert checkpoint tensors.

Storage: ``w13_weight`` [E, 2I, H] (each expert's gate rows, then its up rows) and ``w2_weight`` [E, H, I],
created by the layer's :class:`~llmserve.layers.fused_moe.method.FusedMoEMethodBase` (the quantisation seam).

Tensor parallelism (vLLM's, without expert parallelism): every rank holds every expert, sharded over the
intermediate dimension, like a dense MLP: w13 column-parallel (rank r keeps rows ``[r I/tp, (r+1) I/tp)`` of
gate and of up), w2 row-parallel (the same columns), so each rank's output is a partial sum and one
all-reduce completes it.

Expert parallelism (``--enable-expert-parallel``: the expert-parallel group is the TP group): each rank holds
whole experts, a contiguous range of them (:func:`expert_range`; with an uneven split the first ranks take one
more). Every rank routes all of its tokens the same way (the router is replicated), runs the tokens routed to
its own experts and skips the rest; the same all-reduce sums the ranks' partial outputs. Each expert's weights
live on one rank instead of a slice on every rank, so a rank runs fewer, larger GEMMs.

Checkpoints: hub checkpoints (and transformers' ``save_pretrained``) store one tensor per expert and
projection (``experts.{e}.gate_proj.weight``, Mixtral's ``experts.{e}.w1.weight``); transformers 5 keeps
them fused in memory (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]).
:func:`expert_checkpoint_target` maps both onto the stacked parameters with a shard id ``(expert, "w1" |
"w3" | "w2")`` (None: the fused tensor of every expert), which :meth:`FusedMoE.weight_loader` copies in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from llmserve.distributed.parallel_state import get_ep_group, get_tp_group
from llmserve.layers.activation import gated_activation
from llmserve.layers.fused_moe.method import FusedMoEMethodBase, UnquantizedFusedMoEMethod
from llmserve.layers.linear import check_shape, copy_checked, divide
from llmserve.quantization.base import QuantizationConfig, set_weight_attrs


@dataclass(frozen=True)
class ExpertNames:
    """A checkpoint's names for an expert's gate, up and down projections."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


MIXTRAL_EXPERT_NAMES = ExpertNames(gate="w1", up="w3", down="w2")

_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([A-Za-z0-9_]+)\.([A-Za-z_]+)$")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def expert_checkpoint_target(name: str, names: ExpertNames = ExpertNames()) -> tuple[str, object] | None:
    """``(parameter name, shard id)`` for an expert's checkpoint tensor, None if ``name`` is not one.

    ``model.layers.3.mlp.experts.5.gate_proj.weight`` -> ``(model.layers.3.mlp.experts.w13_weight, (5, "w1"))``
    (a format's other tensors, e.g. ``weight_scale``, map to ``w13_weight_scale``); transformers 5's fused
    ``...experts.gate_up_proj`` -> ``(...experts.w13_weight, None)``.
    """
    fused = _FUSED.match(name)
    if fused:
        prefix, proj = fused.groups()
        return f"{prefix}.{'w13' if proj == 'gate_up_proj' else 'w2'}_weight", None
    per_expert = _PER_EXPERT.match(name)
    if per_expert is None:
        return None
    prefix, expert, proj, suffix = per_expert.groups()
    shard = {names.gate: "w1", names.up: "w3", names.down: "w2"}.get(proj)
    if shard is None:
        return None
    return f"{prefix}.{'w2' if shard == 'w2' else 'w13'}_{suffix}", (int(expert), shard)


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    """Experts ``[start, end)`` held by expert-parallel rank ``ep_rank`` of ``ep_size``: an even split, the first
    ranks taking one more when it does not divide."""
    if num_experts < ep_size:
        raise ValueError(f"cannot distribute {num_experts} experts over {ep_size} expert-parallel ranks: every rank "
                         f"needs at least one")
    base, extra = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, extra)
    return start, start + base + (1 if ep_rank < extra else 0)


class FusedMoE(nn.Module):
    """``num_experts`` gated MLPs (``hidden_size`` -> ``intermediate_size`` -> ``hidden_size``) applied to the
    experts each token was routed to (:class:`~llmserve.layers.fused_moe.router.MoERouter` decides) and summed
    with the routing weights.

    ``reduce_results=False`` leaves the tensor-parallel all-reduce to the caller (who may fold a shared
    expert's partial sum into the same all-reduce). Expert ids stay global (0..num_experts-1) everywhere
    outside the layer: routing, checkpoint shard ids and :attr:`expert_start`/:attr:`num_local_experts` say
    which of them this rank holds.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 reduce_results: bool = True, quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.prefix = prefix
        self.reduce_results = reduce_results
        self.tp_group = get_tp_group()
        ep_group = get_ep_group()
        self.ep_rank, self.ep_size = ep_group.rank, ep_group.world_size
        # With expert parallelism the TP ranks split the experts, not each expert's intermediate dimension.
        self.tp_rank, self.tp_size = (0, 1) if self.ep_size > 1 else (self.tp_group.rank, self.tp_group.world_size)
        self.expert_start, expert_end = expert_range(num_experts, self.ep_rank, self.ep_size)
        self.num_local_experts = expert_end - self.expert_start
        self.intermediate_size_per_partition = divide(intermediate_size, self.tp_size, "moe intermediate size")
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        if method is not None and not isinstance(method, FusedMoEMethodBase):
            raise TypeError(f"{prefix}: quantisation method {type(method).__name__} cannot run a fused MoE layer "
                            f"(it needs a FusedMoEMethodBase)")
        self.quant_method = method or UnquantizedFusedMoEMethod()
        self.quant_method.create_weights(self, self.num_local_experts, hidden_size,
                                         self.intermediate_size_per_partition,
                                         params_dtype or torch.get_default_dtype(), weight_loader=self.weight_loader)
        local = range(self.expert_start, expert_end)
        for name, param in self.named_parameters(recurse=False):
            projection = name.split("_", 1)[0]
            projections = ("w1", "w3") if projection == "w13" else ("w2",)
            set_weight_attrs(param, {"moe_projection": projection,
                                     "shard_ids": tuple((e, p) for e in local for p in projections)})
        self.act_fn = gated_activation(activation)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy one expert's projection (``shard_id=(expert, "w1" | "w3" | "w2")``, unsharded ``[I, H]`` or
        ``[H, I]``), or the stacked tensor of every expert (``None``: ``[E, 2I, H]`` / ``[E, H, I]``), keeping
        this rank's rows of gate and up and its columns of down; an expert another rank holds is skipped."""
        name = getattr(param, "checkpoint_name", "") or self.prefix
        inter = self.intermediate_size_per_partition
        if shard_id is None:
            if param.moe_projection == "w13":
                check_shape(loaded, (self.num_experts, 2 * self.intermediate_size, self.hidden_size), name)
                for expert, (gate, up) in enumerate(t.chunk(2) for t in loaded):
                    self.weight_loader(param, gate, (expert, "w1"))
                    self.weight_loader(param, up, (expert, "w3"))
            else:
                check_shape(loaded, (self.num_experts, self.hidden_size, self.intermediate_size), name)
                for expert, down in enumerate(loaded):
                    self.weight_loader(param, down, (expert, "w2"))
            return
        expert, projection = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{name}: expert {expert} is outside the layer's {self.num_experts} experts")
        expert -= self.expert_start
        if not 0 <= expert < self.num_local_experts:
            return   # another expert-parallel rank's
        if projection == "w2":
            check_shape(loaded, (self.hidden_size, self.intermediate_size), name)
            copy_checked(param.data[expert], loaded.narrow(1, self.tp_rank * inter, inter), name)
            return
        check_shape(loaded, (self.intermediate_size, self.hidden_size), name)
        offset = 0 if projection == "w1" else inter
        copy_checked(param.data[expert].narrow(0, offset, inter), loaded.narrow(0, self.tp_rank * inter, inter), name)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``hidden`` [T, H], ``topk_weights``/``topk_ids`` [T, top_k] -> [T, H] (all-reduced over TP unless
        ``reduce_results`` is off)."""
        if self.ep_size > 1:   # local ids; the experts of other ranks become num_local_experts, which is skipped
            topk_ids = topk_ids - self.expert_start
            topk_ids = topk_ids.masked_fill((topk_ids < 0) | (topk_ids >= self.num_local_experts),
                                            self.num_local_experts)
        out = self.quant_method.apply(self, hidden, topk_weights, topk_ids, self.act_fn)
        if self.reduce_results and self.tp_group.world_size > 1:
            out = self.tp_group.all_reduce(out)
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts} (local {self.expert_start}..+{self.num_local_experts}), "
                f"hidden={self.hidden_size}, inter={self.intermediate_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"ep={self.ep_rank}/{self.ep_size}, method={type(self.quant_method).__name__}")
