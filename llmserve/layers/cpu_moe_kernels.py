"""The compiled library's mixture-of-experts entry points (``csrc/cpu_grouped_linear.c``, ``csrc/cpu_moe_rows.c``).

A MoE layer on CPU is three steps around the experts' GEMMs, and each is one call here:

* :meth:`CPUMoEKernels.sort_rows`: the (token, slot) rows sorted by expert, their inputs gathered;
* :meth:`CPUMoEKernels.grouped_linear`: every expert's rows times its blocked weight, one parallel region
  split over (expert, column panel) pairs (a decode step gives each expert too few rows to split over rows);
* :meth:`CPUMoEKernels.combine`: each token's slots weighted and summed in float32, rounded once.

The PyTorch ops they replace (a sort, a count, gathers, a multiply, ``index_add_``) are each a parallel region
whose fixed cost, on a shared machine, can exceed the GEMMs of a decode step; and a loop over experts costs two
kernel calls and an activation per expert.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from llmserve.layers.cpu_kernels import WEIGHT_BLOCK, _activation_dtype, _check_rows, cpu_kernels

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


class CPUMoEKernels:
    """Typed MoE entry points; activations float32 or bfloat16 CPU tensors."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.llmserve_grouped_linear.argtypes = [_P, _L, _P, _P, _L, _P, _L, _L, _L, _I, _I]
        lib.llmserve_grouped_linear.restype = _I
        lib.llmserve_moe_sort_rows.argtypes = [_P, _L, _L, _L, _P, _L, _L, _L, _P, _P, _P]
        lib.llmserve_moe_sort_rows.restype = _L
        lib.llmserve_moe_combine.argtypes = [_P, _L, _P, _P, _L, _L, _L, _P, _L, _I, _I]
        lib.llmserve_moe_combine.restype = None
        self._lib = lib

    def sort_rows(self, x: torch.Tensor, topk_ids: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, offsets, slot_rows)`` for ``x`` [T, H] and ``topk_ids`` [T, K]: ``rows`` [n, H] holds
        ``x[t]`` once per slot routed to an expert below ``num_experts``, sorted by expert (token order within
        one: expert ``e``'s rows are ``rows[offsets[e]:offsets[e + 1]]``, int64 offsets [E + 1]);
        ``slot_rows`` int64 [T, K] is each slot's row, -1 for the id ``num_experts`` (another rank's expert)."""
        t, h = x.shape
        _check_rows(x, h, "x", _activation_dtype(x))
        ids = topk_ids.to(torch.int64).contiguous()
        rows = torch.empty(ids.numel(), h, dtype=x.dtype)
        offsets = torch.empty(num_experts + 1, dtype=torch.int64)
        slot_rows = torch.empty(ids.shape, dtype=torch.int64)
        n = self._lib.llmserve_moe_sort_rows(ids.data_ptr(), t, ids.shape[1], num_experts, x.data_ptr(), x.stride(0),
                                             h, x.element_size(), rows.data_ptr(), offsets.data_ptr(),
                                             slot_rows.data_ptr())
        if n < 0:
            raise ValueError(f"sort_rows: expert ids must lie in 0..{num_experts}")
        return rows[:n], offsets, slot_rows

    def grouped_linear(self, x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``x[o[e]:o[e+1]] @ W_e.T`` for every expert ``e`` in one call: the rows of the 2-D ``x`` sorted by expert
        (``offsets`` int64 [E+1], from 0 to ``len(x)``), ``weights`` [E, ...] each expert's weight as
        :func:`~llmserve.layers.cpu_kernels.block_weight` makes it, float32 or bfloat16 like ``x``."""
        rows, k = x.shape
        _check_rows(x, k, "x", weights.dtype)
        experts = weights.shape[0]
        bf16 = weights.dtype == torch.bfloat16
        n = weights.shape[1] * WEIGHT_BLOCK
        layout = (experts, n // WEIGHT_BLOCK, (k + 1) // 2, WEIGHT_BLOCK, 2) if bf16 else \
            (experts, n // WEIGHT_BLOCK, k, WEIGHT_BLOCK)
        if tuple(weights.shape) != layout or not weights.is_contiguous():
            raise ValueError(f"grouped_linear: weights {tuple(weights.shape)} are not contiguous blocked expert "
                             f"weights {layout} for {k} inputs")
        if offsets.dtype != torch.int64 or offsets.shape != (experts + 1,) or not offsets.is_contiguous() \
                or int(offsets[0]) != 0 or int(offsets[-1]) != rows:
            raise ValueError(f"grouped_linear: offsets must be int64 [{experts + 1}] from 0 to the {rows} rows")
        out = torch.empty(rows, n, dtype=weights.dtype)
        status = self._lib.llmserve_grouped_linear(x.data_ptr(), x.stride(0), weights.data_ptr(), offsets.data_ptr(),
                                                   experts, out.data_ptr(), n, n, k, int(bf16),
                                                   torch.get_num_threads())
        if status != 0:
            raise ValueError("grouped_linear: the offsets decrease")
        return out

    def combine(self, expert_out: torch.Tensor, slot_rows: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """[T, H]: ``sum_s topk_weights[t, s] * expert_out[slot_rows[t, s]]`` over the slots with a row (>= 0),
        summed in float32; ``expert_out`` [n, H] as :meth:`sort_rows` ordered the rows."""
        t, k = slot_rows.shape
        h = expert_out.shape[1]
        _check_rows(expert_out, h, "expert_out", _activation_dtype(expert_out))
        weights = topk_weights.to(torch.float32).contiguous()
        if weights.shape != (t, k):
            raise ValueError(f"combine: topk_weights {tuple(topk_weights.shape)} must match the slots ({t}, {k})")
        out = torch.empty(t, h, dtype=expert_out.dtype)
        self._lib.llmserve_moe_combine(expert_out.data_ptr(), expert_out.stride(0), slot_rows.data_ptr(),
                                       weights.data_ptr(), t, k, h, out.data_ptr(), h,
                                       int(expert_out.dtype == torch.bfloat16), torch.get_num_threads())
        return out


@lru_cache(maxsize=1)
def cpu_moe_kernels() -> CPUMoEKernels | None:
    """The MoE entry points, or None where the compiled kernels do not load (see :func:`cpu_kernels`)."""
    kernels = cpu_kernels()
    return None if kernels is None else CPUMoEKernels(kernels.library)
