"""The experts' MLPs on GPU: a Triton grouped GEMM over rows sorted by expert (vLLM's fused_moe layout).

:func:`align_by_expert` sorts the flat (token, slot) rows ``t * top_k + s`` by expert and pads each expert's
rows to a multiple of ``BLOCK_M``, so every tile of ``BLOCK_M`` rows belongs to one expert; padding rows hold
the out-of-range row ``T * top_k`` and are masked. Its sizes are upper bounds known without reading the
routing back to the host (no device sync; tiles past the last expert's rows get expert -1 and return at
once), and an expert that received no row has no tile.

:func:`grouped_gemm` runs ``C[row] = A[row // a_row_divisor] @ B[expert]^T`` for every tile's rows, one
program per (row tile, output-column tile), with a float32 accumulator. :func:`fused_experts` calls it
twice: gate/up on the tokens (``a_row_divisor = top_k``), the activation, then down on the (token, slot)
rows, multiplied by their routing weights; the ``top_k`` rows of a token are then summed (no atomics, so
the result does not depend on scheduling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import dot
from llmserve.layers.attention.triton_kernels.launch import dot_precision, needs_upcast
from llmserve.layers.fused_moe.grouped_experts import sort_by_expert

BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [P], tile_experts [P / block_m])``: the flat (token, slot) rows grouped by expert, each expert's
    group padded with ``topk_ids.numel()`` to a multiple of ``block_m``; the expert of each tile (-1 past the
    last group, and for the rows of the id ``num_experts``: experts another expert-parallel rank holds). ``P``
    is the bound ``n + (E + 1) (block_m - 1)`` rounded up to ``block_m``."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    order, counts = sort_by_expert(topk_ids, num_experts + 1)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    first = counts.cumsum(0) - counts
    experts = flat.index_select(0, order)
    positions = padded_end.index_select(0, experts) - padded.index_select(0, experts) \
        + torch.arange(n, device=flat.device) - first.index_select(0, experts)
    capacity = -(-(n + (num_experts + 1) * (block_m - 1)) // block_m) * block_m
    rows = torch.full((capacity,), n, dtype=torch.int64, device=flat.device)
    rows.index_copy_(0, positions, order)
    tile_starts = torch.arange(0, capacity, block_m, device=flat.device)
    tile_experts = torch.searchsorted(padded_end, tile_starts, right=True)
    tile_experts = torch.where(tile_experts < num_experts, tile_experts, -1)
    return rows, tile_experts


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, rows_ptr, tile_experts_ptr, weights_ptr, num_rows, N, K,
                         stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                         A_ROW_DIVISOR: tl.constexpr, MUL_WEIGHTS: tl.constexpr, PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
    if expert >= 0:
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(rows_ptr + offs_m)
        valid = rows < num_rows
        a_rows = tl.where(valid, rows // A_ROW_DIVISOR, 0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + kk[None, :],
                        mask=valid[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + kk[:, None] * stride_bk,
                        mask=(offs_n[None, :] < N) & (kk[:, None] < K), other=0.0)
            acc += dot(a, b, PRECISION, UPCAST)
        if MUL_WEIGHTS:
            acc *= tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < N))


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, tile_experts: torch.Tensor, num_rows: int,
                 a_row_divisor: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r] = a[r // a_row_divisor] @ b[e]^T`` (times ``weights[r]`` if given) for the rows ``r < num_rows``
    of expert ``e``'s tiles (:func:`align_by_expert`); ``a`` [M, K] with contiguous rows, ``b`` [E, N, K].
    Returns ``out`` [num_rows, N] in ``a``'s dtype, zero in the rows no tile holds."""
    out = torch.zeros(num_rows, b.shape[1], dtype=a.dtype, device=a.device)
    if num_rows == 0:
        return out
    a = a if a.stride(1) == 1 else a.contiguous()
    grid = (tile_experts.numel(), triton.cdiv(b.shape[1], BLOCK_N))
    _grouped_gemm_kernel[grid](
        a, b, out, rows, tile_experts, weights if weights is not None else out, num_rows, b.shape[1], b.shape[2],
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        A_ROW_DIVISOR=a_row_divisor, MUL_WEIGHTS=weights is not None, PRECISION=dot_precision(a.dtype),
        UPCAST=needs_upcast(a.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Same contract as :func:`~llmserve.layers.fused_moe.grouped_experts.grouped_experts`, on the Triton kernel."""
    t, k = topk_ids.shape
    rows, tile_experts = align_by_expert(topk_ids, w13.shape[0])
    gate_up = grouped_gemm(x, w13, rows, tile_experts, t * k, a_row_divisor=k)
    down = grouped_gemm(activation(gate_up), w2, rows, tile_experts, t * k, a_row_divisor=1,
                        weights=topk_weights.reshape(-1).float().contiguous())
    return down.view(t, k, -1).sum(1)
