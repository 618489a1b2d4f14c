"""RMSNorm with an optional fused residual add (saves one pass over the hidden states per layer).

On CPU in float32 both run as one compiled pass per row (``cpu_layer_ops.c``)."""

from __future__ import annotations

import torch
from torch import nn

from llmserve.layers.cpu_kernels import kernels_for


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return (x32 * torch.rsqrt(variance + self.eps)).to(dtype) * self.weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``."""
        kernels = kernels_for(x)
        if kernels is not None:
            shape = x.shape
            rows = x.reshape(-1, shape[-1])
            if residual is None:
                return kernels.rms_norm(rows, self.weight, self.eps).view(shape)
            out, total = kernels.rms_norm(rows, self.weight, self.eps, residual.reshape(-1, shape[-1]))
            return out.view(shape), total.view(shape)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
