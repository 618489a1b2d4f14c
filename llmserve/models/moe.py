"""What the mixture-of-experts families (``mixtral.py``, ``qwen2_moe.py``, ``qwen3_moe.py``, ``deepseek_v2.py``)
share on top of the Llama blocks: the sparse feed-forward block (router, routed experts, an optional shared expert)
and the loading of per-expert checkpoint tensors into the stacked experts of :class:`~llmserve.layers.fused_moe.FusedMoE`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llmserve.layers.fused_moe import ExpertNames, FusedMoE, MoERouter, RoutingConfig, expert_checkpoint_target
from llmserve.layers.linear import ReplicatedLinear
from llmserve.models.llama import LlamaBlockSpec, LlamaForCausalLM, LlamaMLP
from llmserve.quantization.base import QuantizationConfig


class SparseMoeBlock(nn.Module):
    """``experts(x, gate(x))``, plus a dense ``shared_expert(x)`` every token goes through, scaled by
    ``sigmoid(shared_expert_gate(x))`` when the family gates it (Qwen2-MoE).

    Checkpoint names: ``gate.weight`` (the router; with ``correction_bias``, also DeepSeek-V3's
    ``gate.e_score_correction_bias``), ``experts.*`` (see
    :func:`~llmserve.layers.fused_moe.expert_checkpoint_target`), ``shared_expert.*``, ``shared_expert_gate.weight``.
    """

    def __init__(self, hidden_size: int, routing: RoutingConfig, intermediate_size: int, activation: str,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 shared_expert: nn.Module | None = None, gated_shared_expert: bool = False,
                 correction_bias: bool = False) -> None:
        super().__init__()
        self.gate = MoERouter(hidden_size, routing, correction_bias)
        self.experts = FusedMoE(routing.num_experts, hidden_size, intermediate_size, activation,
                                quant_config=quant_config, prefix=f"{prefix}.experts")
        self.shared_expert = shared_expert
        self.shared_expert_gate = (ReplicatedLinear(hidden_size, 1, prefix=f"{prefix}.shared_expert_gate")
                                   if shared_expert is not None and gated_shared_expert else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, *self.gate(hidden))
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden)) * shared
            out = out + shared
        return out


def shared_expert_mlp(config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None, prefix: str,
                      size: int) -> LlamaMLP | None:
    """The sparse block's dense ``shared_expert`` of intermediate size ``size``; None for a family without one
    (``size`` 0)."""
    if not size:
        return None
    return LlamaMLP(config, dataclasses.replace(spec, mlp_size=size), quant_config, f"{prefix}.shared_expert")


class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-block family whose feed-forward blocks (some or all) are :class:`SparseMoeBlock`: expert tensors
    load into the stacked experts, named as :attr:`expert_names` says."""

    expert_names: ExpertNames = ExpertNames()

    def param_target(self, name: str, params: Mapping[str, nn.Parameter]) -> tuple[str, object]:
        expert = expert_checkpoint_target(name, self.expert_names)
        if expert is not None and expert[0] in params:
            return expert
        return super().param_target(name, params)
