"""Linear layers that shard themselves over the tensor-parallel group and load their own checkpoint shards.

Each layer creates its weights through a quantisation method (``quant_method.create_weights``), runs
its matmul through ``quant_method.apply`` and repacks once after loading
(``process_weights_after_loading``), so formats plug in without touching layers or models.

Sharding (Megatron placement): a :class:`ColumnParallelLinear` splits its output rows over the TP
ranks and needs no communication; a :class:`RowParallelLinear` splits its input columns and sums the
partial outputs with one all-reduce. Llama's q/k/v and gate/up are column-parallel, o_proj and
down_proj row-parallel: two all-reduces per decoder layer.

Checkpoints store q/k/v and gate/up either separately or fused (``qkv_proj``/``gate_up_proj``, e.g.
Phi-3). Every parameter carries ``weight_loader(param, tensor, shard_id)`` taking the UNSHARDED
checkpoint tensor (one projection by ``shard_id``, or the fused tensor with ``shard_id=None``) and
copying this rank's rows or columns of it, so a model only maps checkpoint names to shard ids.
"""

from __future__ import annotations

import torch
from torch import nn

from llmserve.distributed.parallel_state import get_tp_group
from llmserve.quantization.base import QuantizationConfig, set_weight_attrs
from llmserve.quantization.unquantized import UnquantizedLinearMethod


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...] | torch.Size, name: str = "") -> None:
    """Raise :class:`WeightShapeError` unless ``loaded`` has shape ``expected`` (the unsharded shape)."""
    if tuple(loaded.shape) != tuple(expected):
        raise WeightShapeError(
            f"tensor {name or '?'} has shape {tuple(loaded.shape)} but the model expects {tuple(expected)}")


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    """Copy ``loaded`` into ``param`` after checking the shape, converting dtype on the way."""
    check_shape(loaded, param.shape, name)
    param.data.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    copy_checked(param, loaded, getattr(param, "checkpoint_name", ""))


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def _name(param: torch.Tensor) -> str:
    return getattr(param, "checkpoint_name", "")


class LinearBase(nn.Module):
    """``y = x W^T + b`` whose weight tensors belong to a quantisation method.

    ``input_size``/``output_size`` are the unsharded sizes; subclasses shard them over the TP group
    read from :mod:`~llmserve.distributed.parallel_state` when the layer is built (so a worker builds
    its rank's shard) and call :meth:`_create_parameters` with this rank's sizes.
    """

    shard_ids: tuple[object, ...] = (None,)   # the shard ids its weight_loader takes (None: whole tensor)

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.prefix = prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.tp_group = get_tp_group()
        self.tp_rank = self.tp_group.rank
        self.tp_size = self.tp_group.world_size
        self.checkpoint_sizes = [output_size]   # rows of each projection in the checkpoint (unsharded)
        method = quant_config.get_quant_method(self, prefix) if quant_config is not None else None
        self.quant_method = method or UnquantizedLinearMethod()

    def _create_parameters(self, input_size_per_partition: int, output_partition_sizes: list[int], bias: bool,
                           bias_sharded: bool) -> None:
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = list(output_partition_sizes)
        self.output_size_per_partition = sum(output_partition_sizes)
        self.quant_method.create_weights(self, input_size_per_partition, self.output_partition_sizes,
                                         self.input_size, self.output_size, self.params_dtype,
                                         weight_loader=self.weight_loader)
        if bias:
            rows = self.output_size_per_partition if bias_sharded else self.output_size
            self.bias = nn.Parameter(torch.empty(rows, dtype=self.params_dtype), requires_grad=False)
            attrs = {"weight_loader": self.weight_loader}
            if bias_sharded:
                attrs["output_dim"] = 0
            set_weight_attrs(self.bias, attrs)
        else:
            self.register_parameter("bias", None)

    def _shard_index(self, shard_id: object) -> int:
        if shard_id not in self.shard_ids:
            raise ValueError(f"unknown shard {shard_id!r}; this layer takes {list(self.shard_ids)}")
        return self.shard_ids.index(shard_id)

    def _shard_start(self, index: int) -> int:
        """First checkpoint row of projection ``index`` that this rank holds (0: the outputs are not split)."""
        return 0

    @property
    def input_shard_start(self) -> int:
        """First checkpoint input column this rank holds (0: the inputs are not split)."""
        return 0

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self) -> None:
        """Once, after every tensor is loaded: let the method repack (e.g. block the weight for the CPU kernels)."""
        self.quant_method.process_weights_after_loading(self)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
                f"tp={self.tp_rank}/{self.tp_size}, method={type(self.quant_method).__name__}")


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (small projections not worth sharding)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, output_size, bias, quant_config, prefix, params_dtype=params_dtype)
        self._create_parameters(input_size, [output_size], bias, bias_sharded=True)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        copy_checked(param, loaded, _name(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output rows split evenly over the TP ranks; each rank returns its slice of the output
    (the whole output with ``gather_output``, at the cost of an all-gather).

    ``output_sizes`` (internal, for the fused subclasses): the projections stacked along the output,
    each split over the ranks separately so every rank holds its part of each.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 params_dtype: torch.dtype | None = None, output_sizes: list[int] | None = None) -> None:
        super().__init__(input_size, output_size, bias, quant_config, prefix, params_dtype=params_dtype)
        self.gather_output = gather_output
        sizes = list(output_sizes) if output_sizes is not None else [output_size]
        self.checkpoint_sizes = sizes
        self._create_parameters(input_size, [divide(s, self.tp_size, "output size") for s in sizes], bias,
                                bias_sharded=True)

    def _shard_start(self, index: int) -> int:
        return self.tp_rank * self.output_partition_sizes[index]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        check_shape(loaded, (rows * self.tp_size, *param.shape[1:]), _name(param))
        copy_checked(param, loaded.narrow(0, self.tp_rank * rows, rows), _name(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        if self.gather_output and self.tp_size > 1:
            out = self.tp_group.all_gather(out, dim=-1)
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several projections of the same input stacked along the output (gate_proj + up_proj), each
    split over the TP ranks: a rank's weight is ``[gate rows of rank r; up rows of rank r]``.

    ``shard_id`` is the index of the projection a checkpoint tensor holds; ``None`` is the fused
    checkpoint tensor (the projections stacked, unsharded).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, sum(output_sizes), bias, False, quant_config, prefix,
                         params_dtype=params_dtype, output_sizes=output_sizes)
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        name = _name(param)
        if shard_id is None:   # fused: split into the projections first, then take this rank's rows of each
            check_shape(loaded, (sum(self.checkpoint_sizes), *param.shape[1:]), name)
            for sid, part in zip(self.shard_ids, loaded.split(self.checkpoint_sizes, dim=0)):
                self.weight_loader(param, part, sid)
            return
        index = self._shard_index(shard_id)
        rows = self.output_partition_sizes[index]
        check_shape(loaded, (self.checkpoint_sizes[index], *param.shape[1:]), name)
        offset = sum(self.output_partition_sizes[:index])
        copy_checked(param.data.narrow(0, offset, rows), loaded.narrow(0, self._shard_start(index), rows), name)


def qkv_head_partition(total_num_heads: int, total_num_kv_heads: int, tp_size: int) -> tuple[int, int, int]:
    """``(query heads, KV heads, KV-head replicas)`` per rank for ``tp_size`` ranks.

    Query heads must split evenly. KV heads split evenly when there are at least as many as ranks;
    with fewer (GQA/MQA), each KV head is replicated on ``tp_size / num_kv_heads`` consecutive ranks
    (vLLM's rule), so every rank keeps the query heads that read it.
    """
    if total_num_heads % tp_size:
        raise ValueError(f"num_attention_heads ({total_num_heads}) is not divisible by the tensor-parallel "
                         f"size ({tp_size})")
    if total_num_kv_heads >= tp_size:
        if total_num_kv_heads % tp_size:
            raise ValueError(f"num_key_value_heads ({total_num_kv_heads}) is not divisible by the "
                             f"tensor-parallel size ({tp_size})")
        return total_num_heads // tp_size, total_num_kv_heads // tp_size, 1
    if tp_size % total_num_kv_heads:
        raise ValueError(f"num_key_value_heads ({total_num_kv_heads}) is smaller than the tensor-parallel size "
                         f"({tp_size}) and does not divide it, so KV heads cannot be replicated evenly")
    return total_num_heads // tp_size, 1, tp_size // total_num_kv_heads


class QKVParallelLinear(MergedColumnParallelLinear):
    """The fused query/key/value projection, split by heads; shards are ``"q"``, ``"k"``, ``"v"``.

    Per rank: ``num_heads`` query heads and ``num_kv_heads`` KV heads (``q_size``/``kv_size`` rows),
    KV heads replicated when there are fewer than ranks (see :func:`qkv_head_partition`).
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int | None = None,
                 bias: bool = False, quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 params_dtype: torch.dtype | None = None) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tp_group().world_size
        num_heads, num_kv_heads, replicas = qkv_head_partition(total_num_heads, total_num_kv_heads, tp_size)
        # Sizes summed over the ranks (replicated KV heads counted on every rank that holds them).
        super().__init__(hidden_size, [num_heads * head_size * tp_size, num_kv_heads * head_size * tp_size,
                                       num_kv_heads * head_size * tp_size],
                         bias, quant_config, prefix, params_dtype=params_dtype)
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads, self.num_kv_heads, self.num_kv_head_replicas = num_heads, num_kv_heads, replicas
        self.q_size, self.kv_size = num_heads * head_size, num_kv_heads * head_size
        self.checkpoint_sizes = [total_num_heads * head_size, total_num_kv_heads * head_size,
                                 total_num_kv_heads * head_size]
        self.shard_ids = ("q", "k", "v")

    def _shard_start(self, index: int) -> int:
        if index == 0:
            return self.tp_rank * self.q_size
        return (self.tp_rank // self.num_kv_head_replicas) * self.kv_size


class RowParallelLinear(LinearBase):
    """Input columns split over the TP ranks; the partial outputs are summed with one all-reduce.

    ``input_is_parallel``: the input is already this rank's slice (the output of a column-parallel
    layer); otherwise the layer takes its slice. ``reduce_results=False`` leaves the sum to the caller
    (the partial outputs then carry the bias on rank 0 only). The bias is added once: after the sum.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, input_is_parallel: bool = True,
                 reduce_results: bool = True, quant_config: QuantizationConfig | None = None, prefix: str = "", *,
                 params_dtype: torch.dtype | None = None) -> None:
        super().__init__(input_size, output_size, bias, quant_config, prefix, params_dtype=params_dtype)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self._create_parameters(divide(input_size, self.tp_size, "input size"), [output_size], bias,
                                bias_sharded=False)

    @property
    def input_shard_start(self) -> int:
        return self.tp_rank * self.input_size_per_partition

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        dim = getattr(param, "input_dim", None)
        if dim is None or self.tp_size == 1:   # the bias, or no sharding
            return copy_checked(param, loaded, _name(param))
        cols = param.shape[dim]
        full = list(param.shape)
        full[dim] = cols * self.tp_size
        check_shape(loaded, full, _name(param))
        copy_checked(param, loaded.narrow(dim, self.tp_rank * cols, cols), _name(param))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        if not self.input_is_parallel:
            cols = self.input_size_per_partition
            x = x.narrow(-1, self.tp_rank * cols, cols).contiguous()
        if not self.reduce_results:
            return self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        out = self.tp_group.all_reduce(self.quant_method.apply(self, x, None))
        return out if self.bias is None else out.add_(self.bias)
