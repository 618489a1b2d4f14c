"""Typed entry points of the group-quantised int8 dot-product kernel (``csrc/cpu_group_int8_linear.c``).

The kernel lives in the same per-machine library as :mod:`llmserve.layers.cpu_kernels` (built once by
:mod:`llmserve.layers.cpu_kernel_build`); this module binds its three functions, so that a caller quantises
a batch of activations once and multiplies them by every weight segment of a fused layer.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import torch

from llmserve.layers.cpu_kernels import CPUKernels

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
ACTIVATION_BLOCK = 32   # columns per activation scale (llama.cpp's Q8_0 block)
ACTIVATION_SUM = 16     # columns per activation sum (the smallest weight group)
TILE = 16               # output rows per code tile


@dataclass(frozen=True)
class QuantizedActivations:
    """Rows of x as the kernel multiplies them: int8 ``q`` [M, k], ``scale`` [M, k / 32] and ``sums``
    [M, k / 16], the dequantised values' sums per 16 columns (for the weights' offsets)."""

    q: torch.Tensor
    scale: torch.Tensor
    sums: torch.Tensor


class GroupInt8Kernels:
    """The kernel's functions, bound from the library ``kernels`` loaded."""

    def __init__(self, kernels: CPUKernels) -> None:
        lib = ctypes.CDLL(str(kernels.library))
        lib.llmserve_group_int8_quantize.argtypes = [_P, _L, _L, _L, _P, _P, _P, _I]
        lib.llmserve_group_int8_quantize.restype = _I
        lib.llmserve_group_int8_linear.argtypes = [_P, _P, _P, _L, _L, _P, _P, _P, _L, _I, _I, _P, _P, _L, _I]
        lib.llmserve_group_int8_linear.restype = _I
        lib.llmserve_group_int8_uses_vnni.restype = _I
        self._lib = lib
        self.uses_vnni: bool = bool(lib.llmserve_group_int8_uses_vnni())

    def quantize(self, x: torch.Tensor) -> QuantizedActivations:
        """Each row of float32 ``x`` [M, k] (unit stride along k, k a multiple of 32) quantised per block of 32
        columns to int8 (``max|x| / 127``, round half to even), with the sums of every 16 (dequantised)."""
        rows, k = x.shape
        if x.dtype != torch.float32 or x.stride(1) != 1 or k % ACTIVATION_BLOCK:
            raise ValueError(f"group_int8 quantize: x must be float32 [M, k] with unit stride and k a multiple of "
                             f"{ACTIVATION_BLOCK}, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
        q = torch.empty(rows, k, dtype=torch.int8)
        scale = torch.empty(rows, k // ACTIVATION_BLOCK, dtype=torch.float32)
        sums = torch.empty(rows, k // ACTIVATION_SUM, dtype=torch.float32)
        self._lib.llmserve_group_int8_quantize(x.data_ptr(), x.stride(0), rows, k, q.data_ptr(), scale.data_ptr(),
                                               sums.data_ptr(), torch.get_num_threads())
        return QuantizedActivations(q, scale, sums)

    def linear(self, x: QuantizedActivations, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               n: int, bits: int, group: int, bias: torch.Tensor | None, out: torch.Tensor) -> None:
        """Write ``x W^T (+ bias)`` for the ``n`` rows of one repacked weight into ``out`` [M, n] (a column
        slice of a wider output may be passed: unit stride along n). ``codes`` uint8 [ceil(n / 16), 16 * k * bits / 8],
        ``scales``/``offsets`` float32 [ceil(n / 16), k / group, 16], as
        :mod:`llmserve.quantization.group_int8` lays them out."""
        rows, k = x.q.shape
        tiles = -(-n // TILE)
        if (codes.shape != (tiles, TILE * k * bits // 8) or scales.shape != (tiles, k // group, TILE)
                or offsets.shape != scales.shape or out.shape != (rows, n) or out.stride(1) != 1
                or out.dtype != torch.float32
                or not all(t.is_contiguous() for t in (codes, scales, offsets) + ((bias,) if bias is not None else ()))
                or (bias is not None and bias.shape != (n,))):
            raise ValueError(f"group_int8 linear: operands do not describe {n} rows of {k} inputs in {bits}-bit codes "
                             f"and groups of {group}")
        status = self._lib.llmserve_group_int8_linear(
            x.q.data_ptr(), x.scale.data_ptr(), x.sums.data_ptr(), rows, k, codes.data_ptr(), scales.data_ptr(),
            offsets.data_ptr(), n, bits, group, bias.data_ptr() if bias is not None else None, out.data_ptr(),
            out.stride(0), torch.get_num_threads())
        if status != 0:
            raise ValueError(f"group_int8 linear: {bits}-bit codes in groups of {group} over {k} inputs are not "
                             f"supported (4 or 8 bits, groups of 16 or 32, k a multiple of 32)")


@lru_cache(maxsize=4)
def group_int8_kernels(kernels: CPUKernels) -> GroupInt8Kernels:
    """The group-int8 binding of ``kernels``' library (one per library)."""
    return GroupInt8Kernels(kernels)
