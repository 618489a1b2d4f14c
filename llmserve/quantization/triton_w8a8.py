"""The W8A8 layout's matmul on GPU: int8 activations (quantised per row on the fly) times int8 weights in Triton.

``x W^T`` for :func:`~llmserve.quantization.packed.set_w8a8`'s int8 weight (compressed-tensors INT8,
``--quantization int8``), with :func:`~llmserve.quantization.packed.w8a8_reference`'s arithmetic: the rows are
quantised as :func:`~llmserve.quantization.packed.quantize_rows_int8` does, a program sums the exact integer
products of a ``[BLOCK_M, BLOCK_N]`` tile in int32, 32 columns at a time, and scales them by the row's and the
output channel's scales. Under the Triton interpreter each 32-column product is taken in float32 (exact: at
most 32 x 127 x 127) and added as an integer, since its emulation of an int8 ``tl.dot`` is not exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import INTERPRETED
from llmserve.quantization.packed import quantize_rows_int8

BLOCK_N = 64


@triton.jit
def _w8a8_kernel(xq_ptr, sx_ptr, w_ptr, sw_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, 32):
        cols = k0 + tl.arange(0, 32)
        x = tl.load(xq_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=mask_m[:, None] & (cols[None, :] < K), other=0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :],
                    mask=mask_n[:, None] & (cols[None, :] < K), other=0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee").to(tl.int32)
        else:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
    out = (sx[:, None] * sw[None, :]) * acc.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def w8a8_linear(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, inputs: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``rows [M, inputs] @ W^T (+ bias)`` for the int8 ``weight`` (``[N, >= inputs]``, rows padded) with per-channel
    float32 ``scale`` [N], the rows quantised per row to int8; in ``rows``' dtype."""
    m, n = rows.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=rows.dtype, device=rows.device)
    if m > 0:
        xq, sx = quantize_rows_int8(rows.float())
        block_m = 16 if m <= 16 else 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
        _w8a8_kernel[grid](xq, sx.reshape(m).contiguous(), weight, scale, out, m, n, inputs, xq.stride(0),
                           weight.stride(0), out.stride(0), UPCAST=INTERPRETED, BLOCK_M=block_m, BLOCK_N=BLOCK_N)
    return out if bias is None else out + bias
