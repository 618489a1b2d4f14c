"""Linear layers whose parameters know how to load their checkpoint shards.

Checkpoints store q/k/v and gate/up as separate tensors; we fuse them into one matmul. Each fused
parameter carries a ``weight_loader(param, tensor, shard_id)`` so a model only declares which
checkpoint names map to which shard (see ``models/llama.py``). Quantised and tensor-parallel variants
plug in here later without touching the model files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_kernels import cpu_kernels


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    """Copy ``loaded`` into ``param`` after checking the shape, converting dtype on the way."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise WeightShapeError(
            f"tensor {name or '?'} has shape {tuple(loaded.shape)} but the model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    copy_checked(param, loaded, getattr(param, "checkpoint_name", ""))


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b``, by the fastest path for the shape on this device.

    On CPU in float32, a few rows (decode with few sequences: a matrix-vector product bound by streaming
    the weights) go through the compiled small-batch kernel; more rows through oneDNN, which reads the
    plain row-major weight at 90-97% of its speed on a prepacked one and so needs no second copy of the
    weights. Elsewhere (CUDA, other dtypes, no kernels) ``F.linear``.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        kernels = cpu_kernels()
        if kernels is not None and x.shape[0] <= kernels.max_linear_rows and x.stride(1) == 1:
            return kernels.linear_small_batch(x, weight, bias)
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """``y = x W^T + b`` with a plain (unsharded) weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (e.g. gate_proj + up_proj).

    ``shard_id`` is the index of the projection a checkpoint tensor belongs to.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        self.shard_offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    def _shard_slice(self, shard_id: object) -> tuple[int, int]:
        index = int(shard_id)  # type: ignore[arg-type]
        return self.shard_offsets[index], self.output_sizes[index]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:
            return default_weight_loader(param, loaded)
        offset, size = self._shard_slice(shard_id)
        copy_checked(param.data.narrow(0, offset, size), loaded, getattr(param, "checkpoint_name", ""))


class QKVLinear(MergedLinear):
    """The fused query/key/value projection; shards are named ``"q"``, ``"k"`` and ``"v"``."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def _shard_slice(self, shard_id: object) -> tuple[int, int]:
        return super()._shard_slice({"q": 0, "k": 1, "v": 2}[shard_id])  # type: ignore[index]
