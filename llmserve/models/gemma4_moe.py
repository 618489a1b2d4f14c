"""Gemma 4's mixture-of-experts block (``enable_moe_block``): beside every layer's dense MLP, routed experts on
the shared fused MoE layer, as transformers' ``Gemma4TextRouter`` / ``Gemma4TextExperts`` compute them.

The router reads the layer's pre-MLP residual, not the MLP's input: an unscaled RMSNorm, times a learned
per-channel ``scale`` and ``hidden_size ** -0.5``, then ``proj`` to one logit per expert; softmax (float32),
top-``top_k_experts``, renormalised, and each chosen weight times that expert's ``per_expert_scale``. The
experts (``moe_intermediate_size`` wide, the model's ``hidden_activation`` gating) read
``pre_feedforward_layernorm_2(residual)``; :class:`~llmserve.models.gemma4.Gemma4DecoderLayer` norms their
output and the MLP's separately and sums them.

Checkpoint names (per layer, beside ``mlp.*``): ``router.proj.weight``, ``router.scale``,
``router.per_expert_scale``, the stacked ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
[E, H, I], and the norms ``pre_feedforward_layernorm_2``, ``post_feedforward_layernorm_1`` and ``_2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmserve.layers.fused_moe import FusedMoE, MoERouter, RoutingConfig
from llmserve.layers.layernorm import UnscaledRMSNorm
from llmserve.models.llama import UnsupportedModelConfigError
from llmserve.quantization.base import QuantizationConfig

MOE_CONFIG_KEYS = ("num_experts", "top_k_experts", "moe_intermediate_size")


def check_moe_config(config: Any, name: str) -> None:
    """Refuse an ``enable_moe_block`` config without the expert count, top-k or expert width, or with a top-k
    outside ``1..num_experts``."""
    missing = [key for key in MOE_CONFIG_KEYS if not getattr(config, key, None)]
    if missing:
        raise UnsupportedModelConfigError(f"{name}: enable_moe_block=true needs {', '.join(missing)} in the config")
    if not 1 <= config.top_k_experts <= config.num_experts:
        raise UnsupportedModelConfigError(f"{name}: top_k_experts ({config.top_k_experts}) must be between 1 and "
                                          f"num_experts ({config.num_experts})")


def moe_routing(config: Any) -> RoutingConfig:
    """Softmax over ``num_experts``, top-``top_k_experts`` renormalised (the per-expert scales come after)."""
    return RoutingConfig(config.num_experts, config.top_k_experts, renormalize=True)


class Gemma4Router(nn.Module):
    """``(weights [T, top_k] float32, expert ids [T, top_k])`` for the pre-MLP residual [T, H]; ``proj`` is the
    shared :class:`~llmserve.layers.fused_moe.MoERouter` (its ``weight`` is the checkpoint's ``proj.weight``)."""

    def __init__(self, hidden_size: int, routing: RoutingConfig, eps: float) -> None:
        super().__init__()
        self.norm = UnscaledRMSNorm(eps)
        self.proj = MoERouter(hidden_size, routing)
        self.scale = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(routing.num_experts), requires_grad=False)
        self.root_size = hidden_size ** -0.5

    def forward(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.proj(self.norm(residual) * self.scale * self.root_size)
        return weights * self.per_expert_scale[ids], ids


def gemma4_experts(config: Any, activation: str, quant_config: QuantizationConfig | None,
                   prefix: str) -> FusedMoE:
    """The layer's ``num_experts`` stacked experts of ``moe_intermediate_size``, sharded like every fused MoE."""
    return FusedMoE(config.num_experts, config.hidden_size, config.moe_intermediate_size, activation,
                    quant_config=quant_config, prefix=f"{prefix}.experts")
