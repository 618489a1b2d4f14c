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


def cpu_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked float32 GEMM is about 2x faster than the default BLAS path on x86 CPUs."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_weight_for_cpu(weight: torch.Tensor) -> torch.Tensor:
    # The batch-size hint only tunes the blocking; the packed weight serves any number of rows.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Module):
    """``y = x W^T + b`` with a plain (unsharded) weight.

    After loading, :meth:`pack_for_cpu` may replace the weight by a oneDNN-packed copy (same values,
    a GEMM-friendly layout); ``forward`` then uses it.
    """

    packed_weight: torch.Tensor | None = None

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

    def pack_for_cpu(self) -> None:
        """Swap the weight for its packed copy (the plain one is released, so memory does not grow)."""
        self.packed_weight = pack_weight_for_cpu(self.weight)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, self.bias)
        return F.linear(x, self.weight, self.bias)


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
