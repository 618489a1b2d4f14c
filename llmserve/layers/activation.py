"""MLP activations, plain and gated (``act(gate) * up`` over one fused ``[gate | up]`` matmul output).

SiLU-gating runs as one compiled pass on CPU in float32 and bfloat16 (``cpu_layer_ops.c``) and as one Triton kernel
on a GPU (:mod:`~llmserve.layers.triton_layer_ops`); the GELU variants
are the exact formulas transformers uses under each ``hidden_act`` name, so logits match it to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.layer_ops import layer_ops_for


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation, written out as transformers' ``NewGELUActivation`` does."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# transformers' ``ACT2FN`` names -> the function (only those a supported family uses).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation transformers runs for ``name``; a clear error for one llmserve does not implement."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; llmserve implements: {', '.join(sorted(ACTIVATIONS))}"
                         ) from None


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[gate | up]`` from one fused matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = layer_ops_for(x)
        if kernels is not None and x.dim() == 2 and x.stride(1) == 1:
            return kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ActAndMul(nn.Module):
    """``act(gate) * up`` for any other activation (Gemma's GeGLU: tanh-approximated GELU)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.act = activation_fn(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up

    def extra_repr(self) -> str:
        return self.name


class Activation(nn.Module):
    """A plain (ungated) activation by its transformers name (GPT-2's ``gelu_new``)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.act = activation_fn(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)

    def extra_repr(self) -> str:
        return self.name


def gated_activation(name: str) -> nn.Module:
    """``act(gate) * up`` for transformers' activation ``name`` (the compiled path for SiLU)."""
    return SiluAndMul() if name in ("silu", "swish") else ActAndMul(name)
