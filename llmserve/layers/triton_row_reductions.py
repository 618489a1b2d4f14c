"""The sampler's per-row reductions on GPU, one Triton kernel launch each: ``argmax`` and ``logsumexp`` over the
vocabulary.

``torch.logsumexp`` on CUDA is a chain of kernels (max, a mask for infinite maxima, subtract, exp, sum, log, add),
each launched from Python: at batch 1 the host spends longer issuing them than the GPU runs them, on every
decode step. A program here walks one row in chunks with a running maximum (and the running sum of
``exp(x - max)``, rescaled when the maximum grows), so a step pays one launch. Same results as the compiled CPU
kernels of ``cpu_sampling.c``: the first index of the maximum (a NaN counting as largest); ``-inf`` for a row of
``-inf``, ``inf`` with an ``inf``, NaN with a NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import pow2_at_least

CHUNK = 4096   # columns a program reads per step


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    """The first column of the row's maximum, or of its first NaN (which counts as largest, as in torch)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    best = -float("inf")
    best_at = 0          # a row of -inf: its first column
    nan_seen = 0
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + row * stride + start + cols, mask=start + cols < n, other=-float("inf"))
        is_nan = x != x
        x = tl.where(is_nan, -float("inf"), x)
        top = tl.max(x, axis=0)
        at = tl.min(tl.where(x == top, start + cols, n), axis=0)
        take = (top > best) & (nan_seen == 0)
        best_at = tl.where(take, at, best_at)
        best = tl.where(take, top, best)
        nan_at = tl.min(tl.where(is_nan, start + cols, n), axis=0)
        first_nan = (nan_at < n) & (nan_seen == 0)
        best_at = tl.where(first_nan, nan_at, best_at)
        nan_seen = tl.where(first_nan, 1, nan_seen)
    tl.store(out_ptr + row, best_at.to(tl.int64))


@triton.jit
def _logsumexp_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    top = -float("inf")
    total = 0.0
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + row * stride + start + cols, mask=start + cols < n, other=-float("inf"))
        new_top = tl.maximum(top, tl.max(x, axis=0))
        # x == new_top -> 1 also when both are infinite (exp(inf - inf) would be NaN)
        terms = tl.where(x == new_top, 1.0, tl.exp(x - new_top))
        scale = tl.where(top == new_top, 1.0, tl.exp(top - new_top))
        total = total * scale + tl.sum(tl.where(x == -float("inf"), 0.0, terms), axis=0)
        top = new_top
    tl.store(out_ptr + row, tl.where(top == -float("inf"), top, top + tl.log(tl.where(total == 0, 1.0, total))))


def _launch_args(x: torch.Tensor, name: str) -> tuple[int, int, int]:
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"{name}: x must be a 2-D float32 tensor with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)}")
    rows, n = x.shape
    return rows, n, min(CHUNK, pow2_at_least(n, 16))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` (int64) for a 2-D float32 ``x`` with at least one column."""
    rows, n, block = _launch_args(x, "argmax_rows")
    if n == 0:
        raise ValueError("argmax_rows: rows are empty")
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        _argmax_kernel[(rows,)](x, out, n, x.stride(0), BLOCK=block, num_warps=8)
    return out


def logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, dim=-1)`` (float32) for a 2-D float32 ``x``."""
    rows, n, block = _launch_args(x, "logsumexp_rows")
    out = torch.full((rows,), -float("inf"), dtype=torch.float32, device=x.device)
    if rows and n:
        _logsumexp_kernel[(rows,)](x, out, n, x.stride(0), BLOCK=block, num_warps=8)
    return out
