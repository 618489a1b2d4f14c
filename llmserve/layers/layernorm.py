"""RMSNorm (Llama's, Gemma's ``1 + w``) and LayerNorm, each with an optional fused residual add (saves one
pass over the hidden states per layer).

On CPU in float32 and bfloat16 both forms of RMSNorm run as one compiled pass per row (``cpu_layer_ops.c``), on a
GPU as one Triton kernel (:mod:`~llmserve.layers.triton_layer_ops`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.layer_ops import layer_ops_for
from llmserve.layers.linear import check_shape


class RMSNorm(nn.Module):
    # In bfloat16: Llama rounds the normalised value before the weight multiplies it; Gemma after.
    weight_first = False

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
        kernels = layer_ops_for(x)
        if kernels is not None and (residual is None or residual.dtype == x.dtype):
            shape = x.shape
            rows = x.reshape(-1, shape[-1])
            if residual is None:
                return kernels.rms_norm(rows, self.weight, self.eps, weight_first=self.weight_first).view(shape)
            out, total = kernels.rms_norm(rows, self.weight, self.eps, residual.reshape(-1, shape[-1]),
                                          weight_first=self.weight_first)
            return out.view(shape), total.view(shape)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by ``1 + w`` in float32 (the checkpoint stores ``w``, centred on 0).

    The weight is stored as ``1 + w`` in float32 when it loads, so the float32 path is the plain
    RMSNorm kernel; other dtypes multiply before the cast as transformers does (``(x * (1 + w)).to(dtype)``,
    where Llama casts first).
    """

    weight_first = True

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32), requires_grad=False)
        self.weight.weight_loader = self._load_offset_weight

    @staticmethod
    def _load_offset_weight(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        check_shape(loaded, param.shape, getattr(param, "checkpoint_name", ""))
        param.data.copy_(1.0 + loaded.float())

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return (x32 * torch.rsqrt(variance + self.eps) * self.weight).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with a bias (GPT-2) or without (Command-R), with the same optional fused residual add as
    :class:`RMSNorm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: ``norm(x)``. With it: ``(norm(x + residual), x + residual)``."""
        if residual is not None:
            x = x + residual
        out = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return out if residual is None else (out, x)


class Gemma4RMSNorm(GemmaRMSNorm):
    """Gemma 4's RMSNorm: scales by ``w`` itself (not ``1 + w``), still multiplied in float32 before the cast,
    as transformers' ``Gemma4RMSNorm`` does."""

    @staticmethod
    def _load_offset_weight(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        check_shape(loaded, param.shape, getattr(param, "checkpoint_name", ""))
        param.data.copy_(loaded.float())


class UnscaledRMSNorm(nn.Module):
    """RMSNorm without a weight (Gemma 4's value norm: ``with_scale=False``)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
