"""The attention-backend interface: the only place the CPU and GPU paths differ.

The model runner describes each step's batch once as a :class:`BatchLayout` (which tokens belong to
which sequence, where their K/V go, which blocks hold each sequence's context). A backend turns that
into its own precomputed metadata (masks, index tensors, kernel arguments) once per step, and
``forward`` is then called by every attention layer with that metadata.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    """One step's flattened batch. Sequences whose query is a single token come first (decodes).

    - ``query_lens[i]``: tokens of sequence i computed this step (1 for a decode, a chunk for a prefill);
    - ``context_lens[i]``: tokens of sequence i already in the KV cache before this step;
    - ``block_tables[i]``: the physical block ids holding sequence i, in order;
    - ``slot_mapping[t]``: the flat cache slot (block * block_size + offset) where token t's K/V go.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor
    num_decodes: int
    block_size: int

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]


class AttentionBackend(ABC):
    """Paged attention for mixed prefill + decode batches."""

    name: str

    @abstractmethod
    def build_metadata(self, layout: BatchLayout, device: torch.device) -> object:
        """Precompute per-step tensors shared by all layers."""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: object,
                scale: float) -> torch.Tensor:
        """Store ``key``/``value`` [T, KV, D] in the cache, attend ``query`` [T, H, D] over each
        sequence's cached context causally, and return [T, H, D].

        Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        """


def get_attention_backend(device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The backend for a device (only the PyTorch one exists today; a Triton backend plugs in here)."""
    from llmserve.layers.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(dtype)
