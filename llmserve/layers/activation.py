"""Activations for gated MLPs (one compiled pass on CPU in float32, ``cpu_layer_ops.c``)."""

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_kernels import kernels_for


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[gate | up]`` from one fused matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = kernels_for(x)
        if kernels is not None and x.dim() == 2 and x.stride(1) == 1:
            return kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
