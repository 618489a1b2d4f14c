"""Which compiled implementation runs the per-row ops for a tensor: the CPU kernels (``cpu_layer_ops.c``,
``cpu_sampling.c``), the Triton kernels on a GPU, or None, meaning the PyTorch ops. Each pair exposes the same
functions with the same arguments and results: the layer ops ``rms_norm``, ``silu_and_mul`` and
``rotary_embedding``; the sampler's reductions ``argmax_rows`` and ``logsumexp_rows`` (float32 only)."""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache
from types import ModuleType

import torch

from llmserve.layers.cpu_kernels import ACTIVATION_DTYPES, CPUKernels, kernels_for

logger = logging.getLogger(__name__)

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def layer_ops_for(x: torch.Tensor) -> CPUKernels | ModuleType | None:
    """RMSNorm, SiLU-gating and RoPE for ``x``'s device and dtype, or None where neither kind applies."""
    if x.device.type == "cuda":
        return triton_module("triton_layer_ops") if x.dtype in GPU_DTYPES else None
    return kernels_for(x, ACTIVATION_DTYPES)


def row_reductions_for(x: torch.Tensor) -> CPUKernels | ModuleType | None:
    """Row-wise argmax and logsumexp for a float32 ``x``, or None (other dtypes, or nothing compiled)."""
    if x.dtype != torch.float32:
        return None
    if x.device.type == "cuda":
        return triton_module("triton_row_reductions")
    return kernels_for(x)


@lru_cache(maxsize=None)
def triton_module(name: str) -> ModuleType | None:
    """``llmserve.layers.<name>``, or None where triton does not import (a CUDA build of torch without it)."""
    try:
        return importlib.import_module(f"llmserve.layers.{name}")
    except ImportError as exc:
        logger.info("Triton kernels unavailable (%s): %s falls back to PyTorch ops", exc, name)
        return None
