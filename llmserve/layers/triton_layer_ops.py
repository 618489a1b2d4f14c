"""The per-token layer ops on GPU as one Triton kernel each: RMSNorm (with the residual add), SiLU-gating and the
rotary embedding.

Written as PyTorch ops these are a dozen or more tiny kernels per layer (casts, powers, means, gathers of the
cos/sin rows, concatenations), each a launch and a round trip through memory; at decode sizes the GPU spends
longer on them than on the layer's matmuls. Each kernel here keeps a row in registers and rounds where the
PyTorch formulas (and so transformers) round: to the activations' dtype after the residual add, after the
normalisation (Llama) or after the weight (Gemma), after SiLU and after the product; rotations in float32.
Same semantics as the compiled CPU kernels of ``cpu_layer_ops.c``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import pow2_at_least


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, total_ptr, n, eps, stride_x, stride_r, stride_o,
                     stride_t, HAS_RESIDUAL: tl.constexpr, WEIGHT_FIRST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
             ).to(x.dtype)
        tl.store(total_ptr + row * stride_t + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if WEIGHT_FIRST:
        y = x32 * inv * w
    else:
        y = (x32 * inv).to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             weight_first: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of a 2-D ``x`` (rows contiguous); with ``residual``,
    ``(norm(x + residual), x + residual)``; outputs in ``x``'s dtype."""
    rows, n = x.shape
    if x.stride(1) != 1 or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError(f"rms_norm: x and residual must be [rows, {n}] with contiguous rows")
    if weight.numel() != n or not weight.is_contiguous():
        raise ValueError(f"rms_norm: weight must be {n} contiguous values")
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else out
    if rows:
        r = residual if residual is not None else x
        _rms_norm_kernel[(rows,)](x, r, weight, out, total, n, eps, x.stride(0), r.stride(0), out.stride(0),
                                  total.stride(0), HAS_RESIDUAL=residual is not None, WEIGHT_FIRST=weight_first,
                                  BLOCK=pow2_at_least(n), num_warps=_warps(n))
    return out if residual is None else (out, total)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


SILU_BLOCK = 1024


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a 2-D ``x = [gate | up]`` (rows contiguous), in ``x``'s dtype."""
    rows, width = x.shape
    if x.stride(1) != 1 or width % 2:
        raise ValueError(f"silu_and_mul: x must be [rows, 2 n] with contiguous rows, got {tuple(x.shape)}")
    n = width // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows and n:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](x, out, n, x.stride(0), out.stride(0),
                                                                 BLOCK=SILU_BLOCK)
    return out


@triton.jit
def _rotate_heads(x_ptr, token, pos, cos_ptr, sin_ptr, heads, stride_t, stride_h, half, stride_table,
                  BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_R)
    mask = (h[:, None] < heads) & (r[None, :] < half)
    cos = tl.load(cos_ptr + pos * stride_table + r, mask=r < half, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + r, mask=r < half, other=0.0)[None, :]
    at = x_ptr + token * stride_t + h[:, None] * stride_h + r[None, :]
    x1 = tl.load(at, mask=mask, other=0.0)
    x2 = tl.load(at + half, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(at, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(at + half, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, q_heads, k_heads, stride_qt, stride_qh, stride_kt,
                   stride_kh, half, stride_table, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (token, 0) rotates the token's query heads, (token, 1) its key heads."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr, token, pos, cos_ptr, sin_ptr, q_heads, stride_qt, stride_qh, half, stride_table,
                      BLOCK_H, BLOCK_R)
    else:
        _rotate_heads(k_ptr, token, pos, cos_ptr, sin_ptr, k_heads, stride_kt, stride_kh, half, stride_table,
                      BLOCK_H, BLOCK_R)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> None:
    """Rotate ``q`` [T, H, D] and ``k`` [T, KV, D] in place, in one launch (neox layout: each head's first R
    dims as two halves) by the rows ``positions`` [T] of the float32 tables [rows, R / 2]; dims past R stay."""
    half = cos_cache.shape[1]
    if (sin_cache.shape != cos_cache.shape or sin_cache.stride() != cos_cache.stride() or cos_cache.stride(1) != 1
            or 2 * half > q.shape[2] or q.shape[2] != k.shape[2]):
        raise ValueError(f"rotary_embedding: tables {tuple(cos_cache.shape)} and {tuple(sin_cache.shape)} do not "
                         f"fit heads of {q.shape[2]} dims")
    tokens = q.shape[0]
    if q.stride(2) != 1 or k.stride(2) != 1 or k.shape[0] != tokens or q.dtype != k.dtype:
        raise ValueError("rotary_embedding: q and k must be [T, heads, dims] of one dtype with contiguous dims")
    if not tokens:
        return
    _rotary_kernel[(tokens, 2)](q, k, positions.contiguous(), cos_cache, sin_cache, q.shape[1], k.shape[1],
                                q.stride(0), q.stride(1), k.stride(0), k.stride(1), half, cos_cache.stride(0),
                                BLOCK_H=pow2_at_least(max(q.shape[1], k.shape[1])), BLOCK_R=pow2_at_least(half))


def _warps(n: int) -> int:
    return 1 if n <= 512 else 4 if n <= 4096 else 8
