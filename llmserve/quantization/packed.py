"""Quantised weights as they stay in memory after loading, their PyTorch reference and their matmul.

Every checkpoint format repacks into one of two layouts, so one pair of kernels serves them all:

* **weight-only** (GPTQ, AWQ, compressed-tensors W4A16, FP8; GGUF files on CUDA): per output row, codes
  (4-bit, 8-bit or float8 e4m3) with ``scales``/``zeros`` per group of ``group`` input columns,
  ``W = s * (code - z)``, or ``scales``/``offsets``, ``W = s * code + o`` (GGUF's asymmetric formats, whose
  offsets are no integer multiple of the scale).
  4-bit codes are two per byte, 32 to a 16-byte chunk (byte ``i`` holds code ``i`` in its low nibble and
  code ``i + 16`` in its high one) so the kernel widens a chunk with one mask and one shift. A GPTQ
  ``desc_act`` checkpoint's columns are reordered so groups are contiguous; ``perm`` then reorders ``x``.
* **W8A8** (compressed-tensors INT8, ``--quantization int8``): int8 ``[out, in]`` with per-row scales,
  activations quantised per token on the fly (symmetric, ``max|x| / 127``).

On CUDA each layout runs through a Triton kernel (:mod:`~llmserve.quantization.triton_weight_only`,
:mod:`~llmserve.quantization.triton_w8a8`).
On CPU in float32 the compiled kernels run them (``csrc/cpu_quant_linear.c``, ``cpu_w8a8_linear.c``): up
to ``max_linear_rows`` rows (decode), one pass over the packed weight that dequantises in registers; more rows (prefill, large
batches), the weight dequantised panel by panel into cache for the float GEMM tiles (weight-only), or the
activations quantised and multiplied through ``torch._int_mm`` (W8A8: measured faster there than the VNNI
kernel, docs/benchmarks.md). Elsewhere the reference (dequantise per call, then ``F.linear``) runs, which
is also the tests' oracle for the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_kernels import kernels_for

U4, U8, FP8 = 4, 8, 9        # code formats, as the C kernel numbers them
CHUNK = 32                   # 4-bit codes per 16-byte chunk
W8A8_ALIGN = 64              # int8 weight rows are padded to this many bytes (one VNNI step)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 ``[n, k]`` -> ``[n, ceil(k / 32) * 16]`` bytes in the kernel's chunk order."""
    n, k = codes.shape
    padded = F.pad(codes.to(torch.uint8), (0, -k % CHUNK)).view(n, -1, 2, CHUNK // 2)
    return (padded[:, :, 0] | (padded[:, :, 1] << 4)).reshape(n, -1).contiguous()


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`."""
    n = packed.shape[0]
    chunks = packed.view(n, -1, CHUNK // 2)
    return torch.stack([chunks & 15, chunks >> 4], dim=2).reshape(n, -1)[:, :k]


def set_weight_only(layer: nn.Module, codes: torch.Tensor, code_format: int, scales: torch.Tensor,
                    zeros: torch.Tensor | None, group: int, perm: torch.Tensor | None = None,
                    inputs: int | None = None, offsets: torch.Tensor | None = None) -> None:
    """Store ``W = scales * (codes - zeros)`` (codes ``[out, in]`` as integers, or float8 e4m3 for ``FP8``), or
    ``W = scales * codes + offsets`` when ``offsets`` are given (no zeros then), packed on ``layer`` for
    :func:`apply_weight_only`; ``perm``: the input each column multiplies. ``inputs``: the width of ``x`` when
    it differs from the columns' (padding columns, whose ``perm`` entry is ``inputs``, multiply a zero, so a
    group can be padded to whole chunks whatever its codes)."""
    n, k = codes.shape
    if code_format == U4:
        if int(codes.min()) < 0 or int(codes.max()) > 15:
            raise ValueError("4-bit codes must lie in 0..15")
        packed = pack_nibbles(codes)
    elif code_format == U8:
        packed = codes.to(torch.uint8).contiguous()
    elif code_format == FP8:
        packed = codes.to(torch.float8_e4m3fn).view(torch.uint8).contiguous()
    else:
        raise ValueError(f"unknown code format {code_format}")
    groups = -(-k // group)
    if zeros is not None and offsets is not None:
        raise ValueError("a weight-only layer takes zero points or offsets, not both")
    shift = zeros if offsets is None else offsets
    if scales.shape != (n, groups) or (shift is not None and shift.shape != (n, groups)):
        raise ValueError(f"scales/zeros must be [{n}, {groups}] for {k} inputs in groups of {group}, got "
                         f"{tuple(scales.shape)}" + (f" and {tuple(shift.shape)}" if shift is not None else ""))
    layer.register_buffer("wq_codes", packed, persistent=False)
    layer.register_buffer("wq_scales", scales.float().contiguous(), persistent=False)
    layer.register_buffer("wq_zeros", None if zeros is None else zeros.float().contiguous(), persistent=False)
    layer.register_buffer("wq_offsets", None if offsets is None else offsets.float().contiguous(), persistent=False)
    layer.register_buffer("wq_perm", perm, persistent=False)
    layer.wq_format, layer.wq_group, layer.wq_in = code_format, group, k
    layer.wq_x_in = k if inputs is None else inputs


def dequantize_weight_only(layer: nn.Module) -> torch.Tensor:
    """The float32 weight ``[out, in]`` (columns in ``wq_perm`` order) the packed codes stand for."""
    k, group = layer.wq_in, layer.wq_group
    if layer.wq_format == U4:
        codes = unpack_nibbles(layer.wq_codes, k).float()
    elif layer.wq_format == U8:
        codes = layer.wq_codes.float()
    else:
        codes = layer.wq_codes.view(torch.float8_e4m3fn).float()
    if layer.wq_zeros is not None:
        codes = codes - layer.wq_zeros.repeat_interleave(group, dim=1)[:, :k]
    weight = codes * layer.wq_scales.repeat_interleave(group, dim=1)[:, :k]
    if layer.wq_offsets is not None:
        weight += layer.wq_offsets.repeat_interleave(group, dim=1)[:, :k]
    return weight


def apply_weight_only(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + bias`` for the weight :func:`set_weight_only` stored."""
    rows = x.reshape(-1, layer.wq_x_in)
    if layer.wq_perm is not None:
        if layer.wq_x_in != layer.wq_in:   # padding columns read the zero appended here
            rows = F.pad(rows, (0, 1))
        rows = rows.index_select(1, layer.wq_perm)
    elif rows.stride(1) != 1:
        rows = rows.contiguous()
    kernels = kernels_for(rows)
    if rows.is_cuda:
        from llmserve.quantization.triton_weight_only import weight_only_linear

        out = weight_only_linear(rows, layer.wq_codes, layer.wq_format, layer.wq_scales, layer.wq_zeros,
                                 layer.wq_group, layer.wq_in, bias, layer.wq_offsets)
    elif kernels is not None and layer.wq_offsets is None:   # (offsets: GGUF on CUDA; on CPU it runs group-int8)
        out = kernels.linear_weight_only(rows, layer.wq_codes, layer.wq_format, layer.wq_scales, layer.wq_zeros,
                                         layer.wq_group, layer.wq_in, bias)
    else:
        out = F.linear(rows, dequantize_weight_only(layer).to(rows.dtype), bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def set_w8a8(layer: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Store int8 ``weight`` [out, in] with per-row float ``scale`` [out] for :func:`apply_w8a8`."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or scale.numel() != n:
        raise ValueError(f"W8A8 needs an int8 [out, in] weight and {n} scales, got {weight.dtype} and "
                         f"{scale.numel()} scales")
    padded = F.pad(weight, (0, -k % W8A8_ALIGN)).contiguous()
    layer.register_buffer("w8_weight", padded, persistent=False)
    layer.register_buffer("w8_scale", scale.float().reshape(n).contiguous(), persistent=False)
    layer.register_buffer("w8_comp", (weight.sum(dim=1, dtype=torch.int32) * 128).contiguous(), persistent=False)
    layer.w8_in = k


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantisation (``scale = max|x| / 127``, 1 for an all-zero row; round half to
    even): the activations' arithmetic in :func:`apply_w8a8`, and the weights' for ``--quantization int8``."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    # a tensor divisor: CUDA divides by a Python number as a product with its reciprocal, a bit off at times
    scale = torch.where(amax > 0, amax / torch.full_like(amax, 127.0), torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 arithmetic in PyTorch: int8 activations per row, exact integer dot products, both scales."""
    xq, sx = quantize_rows_int8(x.float())
    dots = (xq.double() @ weight.double().T).float()      # exact: integers far below 2^53
    out = sx * scale.float().reshape(1, -1) * dots
    return out if bias is None else out + bias


def w8a8_int_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`w8a8_reference`'s arithmetic with the integer products from ``torch._int_mm`` (exact int32)."""
    xq, sx = quantize_rows_int8(x)
    out = sx * scale.reshape(1, -1) * torch._int_mm(xq, weight.T).float()
    return out if bias is None else out + bias


def apply_w8a8(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + bias`` for the weight :func:`set_w8a8` stored, activations quantised per token."""
    rows = x.reshape(-1, layer.w8_in)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    kernels = kernels_for(rows)
    if rows.is_cuda:
        from llmserve.quantization.triton_w8a8 import w8a8_linear

        out = w8a8_linear(rows, layer.w8_weight, layer.w8_scale, layer.w8_in, bias)
    elif kernels is not None and (rows.shape[0] <= kernels.max_linear_rows or kernels.w8a8_dot_path != "AVX-512 VNNI"):
        out = kernels.linear_w8a8(rows, layer.w8_weight, layer.w8_scale, layer.w8_comp, layer.w8_in, bias)
    elif kernels is not None:   # many rows with VNNI: oneDNN's int8 GEMM (measured faster there, docs/benchmarks.md;
        # without VNNI it ran hundreds of times slower than the kernel)
        out = w8a8_int_mm(rows, layer.w8_weight[:, :layer.w8_in], layer.w8_scale, bias)
    else:
        out = w8a8_reference(rows, layer.w8_weight[:, :layer.w8_in], layer.w8_scale, bias).to(rows.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])
