"""Typed entry points of the group-quantised int8 dot-product kernel (``csrc/cpu_group_int8_linear.c``).

The kernel lives in the same per-machine library as :mod:`llmserve.layers.cpu_kernels` (built once by
:mod:`llmserve.layers.cpu_kernel_build`). A layer runs in one call that quantises the activations once and
multiplies them by every weight segment of a fused layer; the segments' addresses are gathered once into a
:class:`LayerPlan`, since the per-call Python work is what a small layer's decode step would otherwise wait on.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import torch

from llmserve.layers.cpu_kernels import INT8_DOT_PATHS, CPUKernels

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
        lib = kernels.library
        lib.llmserve_group_int8_quantize.argtypes = [_P, _L, _L, _L, _P, _P, _P, _I]
        lib.llmserve_group_int8_quantize.restype = _I
        lib.llmserve_group_int8_layer.argtypes = [_P, _L, _L, _L, _I, _P, _P, _P, _P, _P, _P, _P, _P, _L, _I]
        lib.llmserve_group_int8_layer.restype = _I
        lib.llmserve_group_int8_dot_path.restype = _I
        self._lib = lib
        self.dot_path: str = INT8_DOT_PATHS[lib.llmserve_group_int8_dot_path()]

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

    def layer(self, x: torch.Tensor, plan: LayerPlan, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T (+ bias)`` for float32 ``x`` [M, k] (unit stride along k) and the weight segments of
        ``plan``, in one call: ``x`` quantised once, each segment writing its columns."""
        rows, k = x.shape
        if x.dtype != torch.float32 or x.stride(1) != 1 or k != plan.k or (
                bias is not None and (bias.dtype != torch.float32 or bias.shape != (plan.n,)
                                      or not bias.is_contiguous())):
            raise ValueError(f"group_int8 layer: x must be float32 [M, {plan.k}] with unit stride and the bias float32 "
                             f"[{plan.n}], got {x.dtype} {tuple(x.shape)}")
        out = torch.empty(rows, plan.n, dtype=torch.float32)
        status = self._lib.llmserve_group_int8_layer(
            x.data_ptr(), x.stride(0), rows, k, plan.count, plan.codes, plan.scales, plan.offsets, plan.rows,
            plan.bits, plan.groups, bias.data_ptr() if bias is not None else None, out.data_ptr(), plan.n,
            torch.get_num_threads())
        if status == -2:
            raise MemoryError("group_int8 layer: no memory for the quantised activations")
        if status != 0:
            raise ValueError(f"group_int8 layer: a segment's format is not supported (k={k})")
        return out


class LayerPlan:
    """A layer's weight segments as the kernel takes them, built once: ``(codes, scales, offsets, rows, bits,
    group)`` per segment, codes uint8 [ceil(rows / 16), 16 * k * bits / 8], scales and offsets float32
    [ceil(rows / 16), k / group, 16] (:mod:`llmserve.quantization.group_int8` lays them out). The plan holds
    the tensors' addresses: they must not be replaced or moved while it is used."""

    def __init__(self, k: int, segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]]) -> None:
        for codes, scales, offsets, rows, bits, group in segments:
            tiles = -(-rows // TILE)
            if (bits not in (4, 8) or group not in (16, 32) or k % ACTIVATION_BLOCK
                    or codes.shape != (tiles, TILE * k * bits // 8) or codes.dtype != torch.uint8
                    or scales.shape != (tiles, k // group, TILE) or offsets.shape != scales.shape
                    or scales.dtype != torch.float32 or offsets.dtype != torch.float32
                    or not all(t.is_contiguous() for t in (codes, scales, offsets))):
                raise ValueError(f"group_int8: operands do not describe {rows} rows of {k} inputs in {bits}-bit codes "
                                 f"and groups of {group} (4 or 8 bits, groups of 16 or 32, k a multiple of 32)")
        self.k, self.count, self.n = k, len(segments), sum(s[3] for s in segments)
        self._tensors = segments   # kept alive with the plan

        def array(kind: type, values: list) -> ctypes.Array:
            return (kind * len(values))(*values)

        self.codes = array(_P, [s[0].data_ptr() for s in segments])
        self.scales = array(_P, [s[1].data_ptr() for s in segments])
        self.offsets = array(_P, [s[2].data_ptr() for s in segments])
        self.rows = array(_L, [s[3] for s in segments])
        self.bits = array(_I, [s[4] for s in segments])
        self.groups = array(_I, [s[5] for s in segments])


@lru_cache(maxsize=4)
def group_int8_kernels(kernels: CPUKernels) -> GroupInt8Kernels:
    """The group-int8 binding of ``kernels``' library (one per library)."""
    return GroupInt8Kernels(kernels)
