"""The experts' MLPs over routed tokens, grouped by expert (the CPU path, and the reference everywhere).

Each (token, slot) pair is one row; the rows are sorted by expert id, so every expert's rows are one
contiguous slice and the expert runs one GEMM for its gate/up projection and one for its down projection
over all of them (never a loop over tokens; an expert that received no row costs nothing). The outputs,
multiplied by their routing weights, are summed back into their tokens.

On CPU (float32 or bfloat16, with the compiled kernels) the sorting and gathering and the weighted sum are one
call each (:mod:`llmserve.layers.cpu_moe_kernels`), and experts blocked for the kernels run every expert's slice
in one call per projection with the activation once over all rows; experts stored any other way (quantised
ones) run one call per expert and projection. Elsewhere PyTorch ops sort, gather and ``index_add_``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from llmserve.layers.cpu_kernels import ACTIVATION_DTYPES
from llmserve.layers.cpu_moe_kernels import cpu_moe_kernels
from llmserve.quantization.unquantized import apply_linear


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, counts)``: the flat (token, slot) rows ``t * top_k + s`` sorted by expert id (stable, so each
    expert's rows keep token order), and the number of rows per expert [E]. Counted by a scatter into a tensor
    of known size (``bincount`` would read the largest id back to the host, which a CUDA graph cannot)."""
    flat = topk_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return flat.argsort(stable=True), counts.scatter_add_(0, flat, torch.ones_like(flat))


def grouped_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum_s weight[t, s] * down_e(act(gate_up_e(x[t])))`` with ``e = topk_ids[t, s]``, for every token t.

    ``x`` [T, H]; ``w13`` [E, 2I, H] (gate rows, then up rows); ``w2`` [E, H, I] (or each expert's weight
    blocked for the CPU kernels, ``[E, out/16, in, 16]``: see :func:`apply_linear`); ``topk_weights`` and
    ``topk_ids`` [T, top_k]; ``activation`` maps [n, 2I] to [n, I] (e.g. SiLU(gate) * up). The id ``E`` marks
    a slot routed to an expert this rank does not hold (expert parallelism): it adds nothing.
    """
    if w13.dim() > 3:   # blocked, which only happens where the CPU kernels load
        kernels = cpu_moe_kernels()
        assert kernels is not None, "blocked experts are only made where the CPU kernels load"
        return _combine_sorted_rows(x, topk_weights, topk_ids, w13.shape[0], lambda rows, offsets:
                                    kernels.grouped_linear(activation(kernels.grouped_linear(rows, w13, offsets)),
                                                           w2, offsets))
    return grouped_expert_rows(x, topk_weights, topk_ids, w13.shape[0], lambda e, rows: apply_linear(
        activation(apply_linear(rows, w13[e], None)), w2[e], None))


def grouped_expert_modules(x: torch.Tensor, w13: Sequence[nn.Module], w2: Sequence[nn.Module],
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                           activation: Callable[[torch.Tensor], torch.Tensor],
                           linear: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """:func:`grouped_experts` for experts stored one module per expert and projection (quantised experts, each
    holding its own packed codes and scales): ``linear(module, rows)`` multiplies rows by that module's weight."""
    return grouped_expert_rows(x, topk_weights, topk_ids, len(w13), lambda e, rows: linear(
        w2[e], activation(linear(w13[e], rows))))


def grouped_expert_rows(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                        expert_mlp: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """:func:`grouped_experts` for experts stored any way: ``expert_mlp(e, rows)`` is expert ``e``'s MLP over
    its rows [n, H] (one call per expert that received rows)."""
    def each_expert(rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        expert_out = torch.empty_like(rows)
        bounds = offsets.tolist()
        for expert in range(num_experts):
            start, end = bounds[expert], bounds[expert + 1]
            if end > start:
                expert_out[start:end] = expert_mlp(expert, rows[start:end])
        return expert_out

    return _combine_sorted_rows(x, topk_weights, topk_ids, num_experts, each_expert)


def _combine_sorted_rows(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                         experts_mlp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sort the (token, slot) rows by expert, run ``experts_mlp(rows, offsets)`` on them (expert ``e``'s rows are
    ``rows[offsets[e]:offsets[e + 1]]``, int64 offsets [E + 1]) and sum its outputs back into their tokens with
    the routing weights; slots with the id ``num_experts`` are left out. On CPU the sorting and the weighted sum
    are one compiled call each."""
    t, k = topk_ids.shape
    if t == 0:
        return torch.zeros_like(x)
    kernels = cpu_moe_kernels() if x.device.type == "cpu" and x.dtype in ACTIVATION_DTYPES else None
    if kernels is not None:
        rows, offsets, slot_rows = kernels.sort_rows(x.contiguous(), topk_ids, num_experts)
        return kernels.combine(experts_mlp(rows, offsets), slot_rows, topk_weights)
    order, counts = sort_by_expert(topk_ids, num_experts + 1)   # the id E sorts last
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts[:num_experts], 0, out=offsets[1:])
    order = order[:int(offsets[-1])]
    tokens = order // k
    expert_out = experts_mlp(x.index_select(0, tokens), offsets)
    expert_out.mul_(topk_weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(x.dtype))
    return torch.zeros_like(x).index_add_(0, tokens, expert_out)
