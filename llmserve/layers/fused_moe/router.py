"""Which experts each token goes to, and with what weight.

Every MoE family routes the same way with a few switches (:class:`RoutingConfig`):

- scores: ``softmax`` over the router logits (Mixtral, Qwen-MoE, DeepSeek-V2) or an independent
  ``sigmoid`` per expert (DeepSeek-V3's ``noaux_tc``);
- an optional per-expert ``e_score_correction_bias`` (V3) added to the scores for CHOOSING experts only:
  the weights are still the uncorrected scores;
- grouped top-k (``num_expert_group``/``topk_group``, DeepSeek): experts fall into equal groups, each token
  keeps only its ``topk_group`` best groups and picks its top-k inside them. A group scores as its best
  expert (V2's ``group_limited_greedy``), or as the sum of its best two when a correction bias is used
  (V3), as transformers and vLLM do;
- ``renormalize`` (``norm_topk_prob``): the chosen weights are divided by their sum;
- ``routed_scaling_factor`` multiplies the final weights (DeepSeek).

Routing runs in float32 whatever the model dtype, so near-ties pick the same experts as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCORING_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RoutingConfig:
    """How a layer turns router logits into ``(weights, expert ids)`` per token."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_expert_group: int | None = None   # grouped top-k (DeepSeek): groups of experts ...
    topk_group: int | None = None         # ... of which each token keeps this many
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_FUNCTIONS:
            raise ValueError(f"unknown MoE scoring function {self.scoring!r}; expected one of {SCORING_FUNCTIONS}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be between 1 and the number of experts "
                             f"({self.num_experts})")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("grouped top-k needs both n_group and topk_group")
        if self.num_expert_group is not None:
            groups, keep = self.num_expert_group, self.topk_group
            if self.num_experts % groups:
                raise ValueError(f"{self.num_experts} experts do not split into n_group={groups} equal groups")
            if not 1 <= keep <= groups or keep * (self.num_experts // groups) < self.top_k:
                raise ValueError(f"topk_group={keep} of n_group={groups} groups cannot hold top_k={self.top_k} "
                                 f"experts")

    @property
    def grouped(self) -> bool:
        return self.num_expert_group is not None and self.num_expert_group > 1


def _group_mask(choice: torch.Tensor, config: RoutingConfig, top2_sum: bool) -> torch.Tensor:
    """[T, E] bool: the experts inside each token's ``topk_group`` best groups."""
    t, groups = choice.shape[0], config.num_expert_group
    grouped = choice.view(t, groups, -1)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1) if top2_sum else grouped.amax(-1)
    best = group_scores.topk(config.topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return mask.unsqueeze(-1).expand_as(grouped).reshape(t, -1)


def select_experts(router_logits: torch.Tensor, config: RoutingConfig,
                   e_score_correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, top_k] float32, expert ids [T, top_k] int64)`` for router logits [T, E]."""
    logits = router_logits.float()
    scores = logits.softmax(-1) if config.scoring == "softmax" else logits.sigmoid()
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    if config.grouped:
        keep = _group_mask(choice, config, top2_sum=e_score_correction_bias is not None)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(config.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if config.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return weights, ids


class MoERouter(nn.Module):
    """The router (``gate``) of an MoE block: ``logits = x W^T`` with ``weight`` [E, hidden] replicated on every
    rank, then :func:`select_experts`. With ``correction_bias`` it also holds DeepSeek-V3's
    ``e_score_correction_bias`` [E] (float32, as checkpoints store it)."""

    def __init__(self, hidden_size: int, config: RoutingConfig, correction_bias: bool = False) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size), requires_grad=False)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias else None)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden.float(), self.weight.float())
        return select_experts(logits, self.config, self.e_score_correction_bias)

    def extra_repr(self) -> str:
        return f"{self.config}"
