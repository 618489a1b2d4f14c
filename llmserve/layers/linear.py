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

from llmserve.layers.cpu_kernels import WEIGHT_BLOCK, block_weight, cpu_kernels


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
    """``x W^T + b``, by the fastest path for the shape and the weight's layout.

    A 3-D ``weight`` is blocked for the CPU kernels (:meth:`Linear.use_blocked_layout`): they run any
    number of rows. A plain weight on CPU in float32: the compiled GEMV for a few rows, else oneDNN;
    elsewhere (CUDA, other dtypes, no kernels) ``F.linear``.
    """
    if weight.dim() == 3:
        kernels = cpu_kernels()
        assert kernels is not None, "a blocked weight is only made where the CPU kernels load"
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        out = kernels.linear_blocked(rows, weight, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        kernels = cpu_kernels()
        if kernels is not None and x.shape[0] <= kernels.max_linear_rows and x.stride(1) == 1:
            return kernels.linear_small_batch(x, weight, bias)
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def blocked_layout_available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [out, in] can be stored blocked for the CPU kernels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % WEIGHT_BLOCK == 0 and cpu_kernels() is not None)


class Linear(nn.Module):
    """``y = x W^T + b`` with an unsharded weight, loaded plain ``[out, in]``; after loading, on CPU,
    :meth:`use_blocked_layout` may store it blocked for the CPU kernels (same values, one copy)."""

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

    def use_blocked_layout(self) -> None:
        if blocked_layout_available(self.weight):
            self.weight.data = block_weight(self.weight.data)

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
