"""The MoE computation one token and one routed slot at a time, in float64: the oracle for the grouped paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_token_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_s weight[t, s] * W2_e (silu(gate_e x_t) * up_e x_t)`` for every token, looping over tokens."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s])
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            out[t] += float(topk_weights[t, s]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


def random_routing(tokens: int, num_experts: int, top_k: int, used_experts: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, ids)`` [tokens, top_k]: distinct experts per token drawn from the first ``used_experts``
    (the others receive no token), positive weights."""
    gen = torch.Generator().manual_seed(seed)
    used = used_experts or num_experts
    ids = torch.stack([torch.randperm(used, generator=gen)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.empty(0, top_k, dtype=torch.int64)
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    return weights, ids
