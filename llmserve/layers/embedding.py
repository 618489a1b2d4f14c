"""Token embedding and LM head, both with their vocabulary rows split over the tensor-parallel ranks.

Shard size: ``ceil(vocab / tp)`` rounded up to a multiple of 16 (the CPU kernels' weight block), the
last shard padded with zero rows. We don't pad to 64 x tp like vLLM: its reason is GPU tile and
LoRA alignment; ours is only that every LM-head shard can be stored blocked. At TP=1 there is no
padding at all, so single-process parameters keep the checkpoint's shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.distributed.parallel_state import get_tp_group
from llmserve.layers.cpu_kernels import WEIGHT_BLOCK
from llmserve.layers.linear import check_shape
from llmserve.quantization.base import QuantizationConfig, QuantizeMethodBase, set_weight_attrs
from llmserve.quantization.unquantized import UnquantizedLinearMethod


def vocab_shard(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int, int]:
    """``(first id, end id, rows)`` of rank ``tp_rank``'s shard: ids ``[first, end)`` in the first
    ``end - first`` of its ``rows`` rows, zeros after."""
    if tp_size == 1:
        return 0, vocab_size, vocab_size
    rows = -(-vocab_size // tp_size)
    rows = -(-rows // WEIGHT_BLOCK) * WEIGHT_BLOCK
    start = min(tp_rank * rows, vocab_size)
    return start, min(start + rows, vocab_size), rows


class _VocabSharded(nn.Module):
    """Shard geometry and the loader shared by the embedding and the LM head."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.vocab_size = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_group = get_tp_group()
        self.tp_rank, self.tp_size = self.tp_group.rank, self.tp_group.world_size
        self.shard_start, self.shard_end, self.shard_rows = vocab_shard(num_embeddings, self.tp_rank, self.tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's rows of the full ``[vocab, hidden]`` checkpoint tensor; zero the padding."""
        check_shape(loaded, (self.vocab_size, self.embedding_dim), getattr(param, "checkpoint_name", ""))
        used = self.shard_end - self.shard_start
        param.data[:used].copy_(loaded[self.shard_start:self.shard_end])
        param.data[used:].zero_()

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size}, dim={self.embedding_dim}, "
                f"rows=[{self.shard_start}, {self.shard_end}) of tp {self.tp_rank}/{self.tp_size}")


class VocabParallelEmbedding(_VocabSharded):
    """Each rank looks up the ids in its shard (others give zeros); an all-reduce sums the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 prefix: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.weight = nn.Parameter(torch.empty(self.shard_rows, embedding_dim,
                                               dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader, "output_dim": 0})

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.shard_start) | (input_ids >= self.shard_end)
        local = (input_ids - self.shard_start).masked_fill_(outside, 0)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(out)


class ParallelLMHead(_VocabSharded):
    """Hidden states -> float32 logits over the full vocabulary (each rank's shard, all-gathered,
    padding trimmed).

    ``tie_to``: reuse the embedding's weight (and shard); it stays row-major because the embedding
    reads rows of it (in bfloat16 on CPU the row-major kernel multiplies it: see
    :func:`~llmserve.quantization.unquantized.apply_linear`). An untied head gets its weight from the
    quantisation method, whose post-load step may store it blocked for the CPU kernels.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", *, params_dtype: torch.dtype | None = None,
                 tie_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.tied = tie_to is not None
        method = None
        if quant_config is not None and not self.tied:
            method = quant_config.get_quant_method(self, prefix)
        self.quant_method: QuantizeMethodBase = method or UnquantizedLinearMethod()
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.quant_method.create_weights(self, embedding_dim, [self.shard_rows], embedding_dim,
                                             self.shard_rows * self.tp_size,
                                             params_dtype or torch.get_default_dtype(),
                                             weight_loader=self.weight_loader)

    def process_weights_after_loading(self) -> None:
        if not self.tied:
            self.quant_method.process_weights_after_loading(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.quant_method.apply(self, hidden_states, None)
        if self.tp_size > 1:
            logits = self.tp_group.all_gather(logits, dim=-1)
            if logits.shape[-1] != self.vocab_size:
                logits = logits[..., :self.vocab_size].contiguous()
        return logits.float()
