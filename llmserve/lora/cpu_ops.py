"""The CPU LoRA kernel (``layers/csrc/cpu_lora.c``): a layer's shrinks and expands for every adapter of the
step in one call, one parallel region, adding into the base output in place.

It runs float32 or bfloat16 activations and slots (summing in float32, rounding each output once; bfloat16 both on
``vdpbf16ps`` where the CPU has AVX512-BF16) whose B is stored rank-major (:func:`~llmserve.lora.punica.new_stack`
lays a CPU stack out so); float16 and a library that cannot be built fall back to
:func:`~llmserve.lora.punica.add_lora` (PyTorch ops). It lives in the library the other CPU kernels are built into
and is bound here, with LoRA.

A step calls the kernel once per linear layer (48 times on a 12-layer model), so the arguments are prepared where
they stop changing: a layer's slots (addresses, strides, ranks, bounds) once per layer (:class:`CPULoRALayer`), the
step's segments and the float32 scratch of the shrunk rows once per step (:class:`CPULoRAStep`, shared by every
layer); a call converts only the activations' addresses.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from llmserve.layers.cpu_kernel_build import build_library
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.lora.punica import LoRABatchMapping, LoRAStack

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
DTYPES = (torch.float32, torch.bfloat16)   # of the activations and of the slots, each either
MAX_SEGMENTS = 256   # the kernel's limit on a step's adapters (its MAX_SEGMENTS); --max-loras is far below it


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if cpu_kernels() is None:   # disabled or not buildable: logged there
        return None
    return bind_library(build_library())   # the library cpu_kernels() loaded (cached build)


def bind_library(path: Path) -> ctypes.CDLL:
    """The kernel library at ``path`` with the LoRA entry point's signature declared."""
    lib = ctypes.CDLL(str(path))
    lib.llmserve_lora_add.argtypes = [_P, _L, _P, _L, _P, _L, _P, _L, _L, _P, _P, _I, _P, _P, _I, _L, _P, _L, _I,
                                      _I, _I]
    lib.llmserve_lora_add.restype = _I
    return lib


def cpu_kernel_runs(stack: LoRAStack) -> bool:
    """Whether :func:`add_lora_cpu` runs this stack (on the CPU in one of :data:`DTYPES`, B rank-major, the
    library built)."""
    return (stack.a.device.type == "cpu" and stack.a.dtype == stack.b.dtype and stack.a.dtype in DTYPES
            and stack.a.is_contiguous() and stack.b.stride(1) == 1
            and _library() is not None)


class CPULoRAStep:
    """A step's arguments to the kernel: the segment table and rows (their addresses) and a float32 scratch for
    the shrunk rows, grown to the widest layer (its row stride is its width)."""

    def __init__(self, mapping: LoRABatchMapping) -> None:
        self.table = mapping.segment_table()   # kept: the kernel reads it through its address
        if len(self.table) > MAX_SEGMENTS:
            raise ValueError(f"the CPU LoRA kernel takes at most {MAX_SEGMENTS} adapters in a step, "
                             f"got {len(self.table)}")
        self.positions = mapping.num_tokens if mapping.rows is None else len(mapping.rows)
        self.segment_args = (None if mapping.rows is None else mapping.rows.data_ptr(), self.table.ctypes.data,
                             len(self.table))
        self.scratch = torch.empty(self.positions, 0, dtype=torch.float32)

    def shrunk(self, width: int) -> torch.Tensor:
        """The scratch, at least ``width`` columns wide."""
        if self.scratch.shape[1] < width:
            self.scratch = torch.empty(self.positions, width, dtype=torch.float32)
        return self.scratch


class CPULoRALayer:
    """A layer's slots bound to the kernel (of ``library``, a :func:`bind_library`; default: the engine's).
    ``slot_ranks`` and ``bounds`` are int64 (``stack.ranks``, ``stack.bounds``) and must outlive it; the stack must
    pass :func:`cpu_kernel_runs`. ``slot_args`` (A, its slot stride, B, its slot and rank strides, the ranks, the
    bounds, the projections), ``in_features``, ``width`` and ``w_bf16`` are the kernel's slot arguments, which the
    fused decode step (:mod:`llmserve.layers.cpu_decode_layers`) passes from C."""

    def __init__(self, stack: LoRAStack, slot_ranks: torch.Tensor, bounds: torch.Tensor,
                 library: ctypes.CDLL | None = None) -> None:
        lib = library or _library()
        assert lib is not None and slot_ranks.dtype == bounds.dtype == torch.int64
        self._call = lib.llmserve_lora_add
        self._stack, self._slot_ranks, self._bounds = stack, slot_ranks, bounds   # kept: read through addresses
        a, b = stack.a, stack.b
        self.slot_args = (a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), b.stride(2), slot_ranks.data_ptr(),
                           bounds.data_ptr(), stack.num_projections)
        self.in_features, self.width = a.shape[2], a.shape[1]
        self.w_bf16 = int(a.dtype == torch.bfloat16)

    def add(self, out: torch.Tensor, x: torch.Tensor, mapping: LoRABatchMapping) -> None:
        """``out[rows] += x[rows] A[slot]^T B[slot]^T`` (per projection) for each segment of ``mapping``, in place;
        ``x`` [tokens, in] and ``out`` [tokens, out] of one dtype of :data:`DTYPES`, unit stride along rows."""
        assert x.dtype == out.dtype and x.dtype in DTYPES and x.stride(1) == 1 and out.stride(1) == 1
        step = mapping.cpu_step()
        shrunk = step.shrunk(self.width)
        self._call(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), *self.slot_args, *step.segment_args,
                   self.in_features, shrunk.data_ptr(), shrunk.shape[1], torch.get_num_threads(),
                   int(x.dtype == torch.bfloat16), self.w_bf16)


def add_lora_cpu(out: torch.Tensor, x: torch.Tensor, stack: LoRAStack, slot_ranks: torch.Tensor,
                 bounds: torch.Tensor, mapping: LoRABatchMapping) -> None:
    """:meth:`CPULoRALayer.add` of a layer bound for this call only."""
    CPULoRALayer(stack, slot_ranks, bounds).add(out, x, mapping)
