"""The weight-only layout's matmul on GPU: one Triton kernel for 4-bit, 8-bit and float8 e4m3 codes.

``x W^T`` with ``W = scales * (codes - zeros)`` or ``W = scales * codes + offsets`` as
:func:`~llmserve.quantization.packed.set_weight_only` stores it (GPTQ, AWQ, compressed-tensors W4A16 and FP8,
``--quantization fp8``; GGUF files, with offsets). A program computes a ``[BLOCK_M, BLOCK_N]``
tile of the output, walking the inputs a 32-column chunk at a time: a 4-bit chunk is 16 bytes per output row, its
low nibbles columns 0-15 and its high nibbles 16-31, so each half is unpacked with one shift and mask, scaled by
its columns' groups (any width: each column finds its group) and multiplied into a float32
accumulator. The weight is read packed, once per row tile; no dequantised copy is kept. Columns past the
layer's inputs (a 4-bit row is padded to whole chunks) multiply zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import _fp8_to_float, dot
from llmserve.layers.attention.triton_kernels.launch import dot_precision, needs_upcast
from llmserve.quantization.packed import FP8, U4, U8

BLOCK_N = 64


@triton.jit
def _weight_only_kernel(x_ptr, codes_ptr, scales_ptr, shift_ptr, out_ptr, M, N, K, groups, group, stride_xm,
                        stride_codes, stride_om, FORMAT: tl.constexpr, SHIFT: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    half = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 32):
        for h in tl.static_range(2):   # the chunk's columns k0 + 16 h + i
            cols = k0 + 16 * h + half
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                        mask=mask_m[:, None] & (cols[None, :] < K), other=0.0)
            if FORMAT == 4:
                byte = tl.load(codes_ptr + offs_n[:, None] * stride_codes + (k0 // 2 + half)[None, :],
                               mask=mask_n[:, None], other=0)
                w = ((byte >> (4 * h)) & 15).to(tl.float32)
            else:
                byte = tl.load(codes_ptr + offs_n[:, None] * stride_codes + cols[None, :],
                               mask=mask_n[:, None] & (cols[None, :] < K), other=0)
                if FORMAT == 8:
                    w = byte.to(tl.float32)
                else:
                    w = _fp8_to_float(byte, 3, 7)
            g = tl.minimum(cols // group, groups - 1)   # past the inputs: the last group (their x is zero)
            at = offs_n[:, None] * groups + g[None, :]
            if SHIFT == 1:   # zero points
                w = w - tl.load(shift_ptr + at, mask=mask_n[:, None], other=0.0)
            w = w * tl.load(scales_ptr + at, mask=mask_n[:, None], other=0.0)
            if SHIFT == 2:   # offsets (GGUF's codes times a scale are exact, so this is its one rounding)
                w = w + tl.load(shift_ptr + at, mask=mask_n[:, None], other=0.0)
            acc += dot(x, tl.trans(w.to(x.dtype)), PRECISION, UPCAST)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def weight_only_linear(rows: torch.Tensor, codes: torch.Tensor, code_format: int, scales: torch.Tensor,
                       zeros: torch.Tensor | None, group: int, inputs: int, bias: torch.Tensor | None,
                       offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``rows [M, inputs] @ W^T (+ bias)`` for the packed weight (``codes``, ``scales`` / ``zeros`` or ``offsets``
    ``[N, groups]`` float32), in ``rows``' dtype with float32 accumulation."""
    if code_format not in (U4, U8, FP8):
        raise ValueError(f"unknown code format {code_format}")
    if zeros is not None and offsets is not None:
        raise ValueError("a weight-only layer takes zero points or offsets, not both")
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m, n = rows.shape[0], codes.shape[0]
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    if m == 0:
        return out if bias is None else out + bias
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
    shift = 1 if zeros is not None else 2 if offsets is not None else 0
    _weight_only_kernel[grid](rows, codes, scales, zeros if shift == 1 else offsets if shift else scales, out, m, n,
                              inputs, scales.shape[1], group, rows.stride(0), codes.stride(0), out.stride(0),
                              FORMAT=code_format, SHIFT=shift, PRECISION=dot_precision(rows.dtype),
                              UPCAST=needs_upcast(rows.dtype), BLOCK_M=block_m, BLOCK_N=BLOCK_N)
    return out if bias is None else out + bias
