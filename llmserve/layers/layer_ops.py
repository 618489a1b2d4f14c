"""Which compiled implementation runs the per-token layer ops (RMSNorm, SiLU-gating, the rotary embedding) for a
tensor: the CPU kernels (``cpu_layer_ops.c``), the Triton kernels on a GPU, or None, meaning the PyTorch ops.
Both expose ``rms_norm``, ``silu_and_mul`` and ``rotary_embedding`` with the same arguments and results."""

from __future__ import annotations

import logging
from functools import lru_cache
from types import ModuleType

import torch

from llmserve.layers.cpu_kernels import ACTIVATION_DTYPES, CPUKernels, kernels_for

logger = logging.getLogger(__name__)

GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def layer_ops_for(x: torch.Tensor) -> CPUKernels | ModuleType | None:
    """The ops for ``x``'s device and dtype, or None where neither kind applies (or could be loaded)."""
    if x.device.type == "cuda":
        return triton_layer_ops() if x.dtype in GPU_DTYPES else None
    return kernels_for(x, ACTIVATION_DTYPES)


@lru_cache(maxsize=1)
def triton_layer_ops() -> ModuleType | None:
    try:
        from llmserve.layers import triton_layer_ops as ops
    except ImportError as exc:   # a CUDA build of torch without triton
        logger.info("Triton layer ops unavailable (%s): RMSNorm, SiLU and RoPE run as PyTorch ops", exc)
        return None
    return ops
