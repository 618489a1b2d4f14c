"""The weight-only layout's matmul on GPU: Triton kernels for 4-bit, 8-bit and float8 e4m3 codes.

``x W^T`` with ``W = scales * (codes - zeros)`` or ``W = scales * codes + offsets`` as
:func:`~llmserve.quantization.packed.set_weight_only` stores it (GPTQ, AWQ, compressed-tensors W4A16 and FP8,
``--quantization fp8``; GGUF files, with offsets). Weights are decoded a ``[BLOCK_N, TILE_K]`` tile at a time in
the packing's column order: a 4-bit 32-column chunk is 16 bytes per output row, its low nibbles columns 0-15 and
its high nibbles 16-31, so a tile is read as two halves ("low" and "high" columns, one shift and mask apart), and
byte codes are read in the same column order so that one decoder serves every format. Scales (and zero points or
offsets) are loaded once per row when a tile lies in one group, once per row and 16-column segment when groups
are whole segments (GGUF's 16- and 32-column groups, GPTQ's 32 or 64), else per column: a gather per weight
was the GGUF layout's bottleneck. Columns past the layer's inputs (a 4-bit row is padded to whole chunks)
multiply zeros.

Two ways to use the tiles, by the number of rows:
- up to :data:`MAX_KERNEL_ROWS` rows (decode), one kernel multiplies the tiles into a float32 accumulator,
  reading the packed weight once per row tile; when the output tiles alone would leave most of the GPU's
  multiprocessors idle (one row, a narrow layer), the inputs are split among several programs (split-K) whose
  float32 partial sums are added after;
- above it (prefill, larger decode batches), the weight is decoded once into the rows' dtype and multiplied by
  the float GEMM, which is what vLLM does for GGUF's large batches: the decode is one pass over the weight, the
  GEMM runs at the library's speed (where the two cross was measured on an H200: docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import INTERPRETED, _fp8_to_float, dot
from llmserve.layers.attention.triton_kernels.launch import dot_precision, needs_upcast
from llmserve.quantization.packed import FP8, U4, U8

BLOCK_N = 64
HALF_K = 64               # a tile is 2 * HALF_K = 128 input columns (four 32-column chunks)
TILE_K = 2 * HALF_K
MAX_KERNEL_ROWS = 16      # more rows than this: decode the weight once and use the float GEMM
BLOCK_M = 16              # the kernel's rows: one row tile covers every step it takes
MIN_TILES_PER_SPLIT = 4   # a split-K program walks at least this many tiles
# Software-pipelining depth for float32 rows (a correctness path, not a fast one): three stages of float32 tiles
# 64 rows high needed more shared memory than an H200 has; two keep a margin whatever the row tile.
FLOAT32_STAGES = 2


@triton.jit
def _group_values(ptr, offs_n, mask_n, cols, k0, first, groups, group, SCALES: tl.constexpr,
                  BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """The per-group values (``[N, groups]`` at ``ptr``) of the tile half whose columns are ``cols``
    (``k0 + 32 c + first + i``); columns past the inputs take the last group (their x is zero)."""
    if SCALES == 1:     # the tile lies in one group: a value per output row
        g = tl.minimum(k0 // group, groups - 1)
        return tl.load(ptr + offs_n * groups + g, mask=mask_n, other=0.0)[:, None]
    elif SCALES == 2:   # groups of whole 16-column segments: a value per row and segment, spread over its columns
        g = tl.minimum((k0 + 32 * tl.arange(0, HALF // 16) + first) // group, groups - 1)
        v = tl.load(ptr + offs_n[:, None] * groups + g[None, :], mask=mask_n[:, None], other=0.0)
        return tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_N, HALF // 16, 16)), (BLOCK_N, HALF))
    else:               # any width: each column finds its group
        g = tl.minimum(cols // group, groups - 1)
        return tl.load(ptr + offs_n[:, None] * groups + g[None, :], mask=mask_n[:, None], other=0.0)


@triton.jit
def _weight_tile(codes_ptr, scales_ptr, shift_ptr, offs_n, mask_n, k0, K, row_bytes, groups, group,
                 stride_codes, FORMAT: tl.constexpr, SHIFT: tl.constexpr, SCALES: tl.constexpr,
                 BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """The float32 weight of the tile's columns ``cols_lo`` and ``cols_hi`` (``[BLOCK_N, HALF]`` each, the
    columns ``k0 + 32 c + i`` and ``k0 + 32 c + 16 + i`` for chunk ``c``, ``i < 16``)."""
    b = tl.arange(0, HALF)
    cols_lo = k0 + 32 * (b // 16) + b % 16
    cols_hi = cols_lo + 16
    row = offs_n[:, None] * stride_codes
    if FORMAT == 4:
        at = k0 // 2 + b
        byte = tl.load(codes_ptr + row + at[None, :], mask=mask_n[:, None] & (at[None, :] < row_bytes), other=0)
        w_lo = (byte & 15).to(tl.float32)
        w_hi = ((byte >> 4) & 15).to(tl.float32)
    else:
        lo = tl.load(codes_ptr + row + cols_lo[None, :], mask=mask_n[:, None] & (cols_lo[None, :] < K), other=0)
        hi = tl.load(codes_ptr + row + cols_hi[None, :], mask=mask_n[:, None] & (cols_hi[None, :] < K), other=0)
        if FORMAT == 8:
            w_lo, w_hi = lo.to(tl.float32), hi.to(tl.float32)
        else:
            w_lo, w_hi = _fp8_to_float(lo, 3, 7), _fp8_to_float(hi, 3, 7)
    s_lo = _group_values(scales_ptr, offs_n, mask_n, cols_lo, k0, 0, groups, group, SCALES, BLOCK_N, HALF)
    s_hi = _group_values(scales_ptr, offs_n, mask_n, cols_hi, k0, 16, groups, group, SCALES, BLOCK_N, HALF)
    if SHIFT != 0:
        z_lo = _group_values(shift_ptr, offs_n, mask_n, cols_lo, k0, 0, groups, group, SCALES, BLOCK_N, HALF)
        z_hi = _group_values(shift_ptr, offs_n, mask_n, cols_hi, k0, 16, groups, group, SCALES, BLOCK_N, HALF)
    if SHIFT == 1:   # zero points
        w_lo, w_hi = w_lo - z_lo, w_hi - z_hi
    w_lo, w_hi = w_lo * s_lo, w_hi * s_hi
    if SHIFT == 2:   # offsets (GGUF's codes times a scale are exact, so this is its one rounding)
        w_lo, w_hi = w_lo + z_lo, w_hi + z_hi
    return w_lo, cols_lo, w_hi, cols_hi


@triton.jit
def _weight_only_kernel(x_ptr, codes_ptr, scales_ptr, shift_ptr, out_ptr, M, N, K, row_bytes, groups, group,
                        k_per_split, stride_xm, stride_codes, stride_os, stride_om, FORMAT: tl.constexpr,
                        SHIFT: tl.constexpr, SCALES: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over the inputs ``[split * k_per_split, + k_per_split)``; with
    several splits ``out`` is the float32 partial sums ``[splits, M, N]``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * k_per_split
    end = tl.minimum(start + k_per_split, K)
    for k0 in range(start, end, 2 * HALF):
        w_lo, cols_lo, w_hi, cols_hi = _weight_tile(codes_ptr, scales_ptr, shift_ptr, offs_n, mask_n, k0, K,
                                                    row_bytes, groups, group, stride_codes, FORMAT, SHIFT,
                                                    SCALES, BLOCK_N, HALF)
        x_lo = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols_lo[None, :],
                       mask=mask_m[:, None] & (cols_lo[None, :] < K), other=0.0)
        x_hi = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols_hi[None, :],
                       mask=mask_m[:, None] & (cols_hi[None, :] < K), other=0.0)
        acc += dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)), PRECISION, UPCAST)
        acc += dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)), PRECISION, UPCAST)
    tl.store(out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, shift_ptr, out_ptr, N, K, row_bytes, groups, group, stride_codes,
                       stride_on, FORMAT: tl.constexpr, SHIFT: tl.constexpr, SCALES: tl.constexpr,
                       BLOCK_N: tl.constexpr, HALF: tl.constexpr):
    """One ``[BLOCK_N, 2 HALF]`` tile of the weight, written in ``out``'s dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * 2 * HALF
    mask_n = offs_n < N
    w_lo, cols_lo, w_hi, cols_hi = _weight_tile(codes_ptr, scales_ptr, shift_ptr, offs_n, mask_n, k0, K, row_bytes,
                                                groups, group, stride_codes, FORMAT, SHIFT, SCALES, BLOCK_N, HALF)
    row = offs_n[:, None] * stride_on
    tl.store(out_ptr + row + cols_lo[None, :], w_lo.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (cols_lo[None, :] < K))
    tl.store(out_ptr + row + cols_hi[None, :], w_hi.to(out_ptr.dtype.element_ty),
             mask=mask_n[:, None] & (cols_hi[None, :] < K))


def _layout_args(codes: torch.Tensor, code_format: int, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group: int, offsets: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The shift tensor (zeros, offsets or an unread stand-in) and the kernels' layout constexprs."""
    if code_format not in (U4, U8, FP8):
        raise ValueError(f"unknown code format {code_format}")
    if zeros is not None and offsets is not None:
        raise ValueError("a weight-only layer takes zero points or offsets, not both")
    shift = 1 if zeros is not None else 2 if offsets is not None else 0
    groups = scales.shape[1]
    # a value per row and tile, per row and 16-column segment, or per column (see _group_values)
    per = 1 if groups == 1 or group % TILE_K == 0 else 2 if group % 16 == 0 else 0
    tensor = zeros if shift == 1 else offsets if shift else scales
    return tensor, dict(FORMAT=code_format, SHIFT=shift, SCALES=per, HALF=HALF_K)


def dequantize_weight(codes: torch.Tensor, code_format: int, scales: torch.Tensor, zeros: torch.Tensor | None,
                      group: int, inputs: int, dtype: torch.dtype, offsets: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The weight ``[N, inputs]`` in ``dtype``: :func:`~llmserve.quantization.packed.dequantize_weight_only`'s
    values in one pass over the packed codes."""
    shift, layout = _layout_args(codes, code_format, scales, zeros, group, offsets)
    n = codes.shape[0]
    out = torch.empty(n, inputs, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(inputs, TILE_K))
    if n and inputs:
        _dequantize_kernel[grid](codes, scales, shift, out, n, inputs, codes.shape[1], scales.shape[1], group,
                                 codes.stride(0), out.stride(0), BLOCK_N=BLOCK_N, **layout)
    return out


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if INTERPRETED or device.type != "cuda":
        return 8   # the interpreter has no device to ask: a small GPU's worth
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(output_tiles: int, inputs: int, multiprocessors: int) -> int:
    """Split-K factor: enough programs for about two per multiprocessor, each walking at least
    :data:`MIN_TILES_PER_SPLIT` tiles of the inputs."""
    wanted = -(-2 * multiprocessors // output_tiles)
    useful = max(1, -(-inputs // TILE_K) // MIN_TILES_PER_SPLIT)
    return max(1, min(wanted, useful))


def weight_only_linear(rows: torch.Tensor, codes: torch.Tensor, code_format: int, scales: torch.Tensor,
                       zeros: torch.Tensor | None, group: int, inputs: int, bias: torch.Tensor | None,
                       offsets: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """``rows [M, inputs] @ W^T (+ bias)`` for the packed weight (``codes``, ``scales`` / ``zeros`` or ``offsets``
    ``[N, groups]`` float32), in ``rows``' dtype with float32 accumulation. ``splits``: the split-K factor for
    the kernel's path (default: :func:`choose_splits`)."""
    shift, layout = _layout_args(codes, code_format, scales, zeros, group, offsets)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m, n = rows.shape[0], codes.shape[0]
    if m > MAX_KERNEL_ROWS:
        weight = dequantize_weight(codes, code_format, scales, zeros, group, inputs, rows.dtype, offsets)
        return torch.nn.functional.linear(rows, weight, bias)
    if m == 0:
        out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
        return out if bias is None else out + bias
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    if splits is None:
        splits = choose_splits(tiles, inputs, _multiprocessors(rows.device))
    k_per_split = triton.cdiv(triton.cdiv(inputs, splits), TILE_K) * TILE_K
    splits = triton.cdiv(inputs, k_per_split)   # none empty
    if splits == 1:
        out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    else:
        out = torch.empty(splits, m, n, dtype=torch.float32, device=rows.device)
    _weight_only_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N), splits)](
        rows, codes, scales, shift, out, m, n, inputs, codes.shape[1], scales.shape[1], group, k_per_split,
        rows.stride(0), codes.stride(0), out.stride(0) if splits > 1 else 0, out.stride(-2),
        PRECISION=dot_precision(rows.dtype), UPCAST=needs_upcast(rows.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        num_stages=FLOAT32_STAGES if rows.element_size() == 4 else 3, **layout)
    if splits > 1:
        out = out.sum(0).to(rows.dtype)
    return out if bias is None else out + bias
