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
from typing import Protocol

import torch

from llmserve.layers.cpu_kernels import INT8_DOT_PATHS, CPUKernels

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
ACTIVATION_BLOCK = 32   # columns per activation scale (llama.cpp's Q8_0 block)
ACTIVATION_SUM = 16     # columns per activation sum (the smallest weight group)
TILE = 16               # output rows per code tile


class PackedSegment(Protocol):
    """A weight segment in the kernel's layout (:class:`llmserve.quantization.group_int8.GroupInt8Segment`)."""

    codes: torch.Tensor
    d: torch.Tensor
    sc: torch.Tensor | None
    m: torch.Tensor | None
    mins: torch.Tensor | None
    rows: int
    bits: int
    group: int
    per_block: int
    zero: int


class WeightSegment(ctypes.Structure):
    """One segment as the kernel takes it (``gi8_weight`` in ``csrc/cpu_group_int8.h``)."""

    _fields_ = [("codes", _P), ("d", _P), ("sc", _P), ("m", _P), ("mins", _P), ("rows", _L), ("bits", _I),
                ("group", _I), ("per_block", _I), ("zero", _I)]


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
        lib.llmserve_group_int8_layer.argtypes = [_P, _L, _L, _L, _I, _P, _P, _P, _L, _I]
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
            x.data_ptr(), x.stride(0), rows, k, plan.count, plan.weights, bias.data_ptr() if bias is not None else None,
            out.data_ptr(), plan.n, torch.get_num_threads())
        if status == -2:
            raise MemoryError("group_int8 layer: no memory for the quantised activations")
        if status != 0:
            raise ValueError(f"group_int8 layer: a segment's format is not supported (k={k})")
        return out


class LayerPlan:
    """A layer's weight segments as the kernel takes them, built once: per segment codes uint8
    [ceil(rows / 16), 2 * bits * k], ``d`` (and ``m``) float16 [ceil(rows / 16), blocks, 16], ``sc`` int8 and
    ``mins`` uint8 [ceil(rows / 16), k / group, 16] or None (:mod:`llmserve.quantization.group_int8` lays them
    out). The plan holds the tensors' addresses: they must not be replaced or moved while it is used."""

    def __init__(self, k: int, segments: list[PackedSegment]) -> None:
        for s in segments:
            if not _describes(s, k):
                raise ValueError(f"group_int8: operands do not describe {s.rows} rows of {k} inputs in {s.bits}-bit "
                                 f"codes, groups of {s.group} and blocks of {s.per_block} groups (4, 6 or 8 "
                                 f"bits, groups of 16 or 32, blocks of a power of 2 groups, k a multiple of 32 and "
                                 f"of the blocks)")
        self.k, self.count, self.n = k, len(segments), sum(s.rows for s in segments)
        self._segments = segments   # kept alive with the plan

        def address(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        self.weights = (WeightSegment * len(segments))(*(
            WeightSegment(s.codes.data_ptr(), s.d.data_ptr(), address(s.sc), address(s.m), address(s.mins), s.rows,
                          s.bits, s.group, s.per_block, s.zero) for s in segments))


def _describes(s: PackedSegment, k: int) -> bool:
    """Whether ``s``'s tensors have the shapes, dtypes and layout of ``s.rows`` rows of ``k`` inputs."""
    tiles = -(-s.rows // TILE)
    if (s.bits not in (4, 6, 8) or s.group not in (16, 32) or k % ACTIVATION_BLOCK or s.per_block < 1
            or s.per_block & (s.per_block - 1) or k % (s.group * s.per_block)):
        return False
    groups = k // s.group
    expected = [(s.codes, (tiles, TILE * k * s.bits // 8), torch.uint8, False),
                (s.d, (tiles, groups // s.per_block, TILE), torch.float16, False),
                (s.m, (tiles, groups // s.per_block, TILE), torch.float16, True),
                (s.sc, (tiles, groups, TILE), torch.int8, True), (s.mins, (tiles, groups, TILE), torch.uint8, True)]
    return all((t is None and optional) or (t is not None and t.shape == shape and t.dtype == dtype
                                             and t.is_contiguous())
               for t, shape, dtype, optional in expected)


@lru_cache(maxsize=4)
def group_int8_kernels(kernels: CPUKernels) -> GroupInt8Kernels:
    """The group-int8 binding of ``kernels``' library (one per library)."""
    return GroupInt8Kernels(kernels)
