"""The attention layer models use: holds its head geometry and its slice of the KV cache."""

from __future__ import annotations

import torch
from torch import nn

from llmserve.layers.attention.backend import AttentionBackend


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Bound by the model runner once the cache is allocated.
        self.backend: AttentionBackend | None = None
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)

    def bind_cache(self, backend: AttentionBackend, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        self.backend = backend
        self.key_cache = key_cache
        self.value_cache = value_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: object) -> torch.Tensor:
        """``q`` [T, H*D], ``k``/``v`` [T, KV*D] -> [T, H*D]."""
        assert self.backend is not None, "KV cache not allocated: call ModelRunner.allocate_kv_cache first"
        t = q.shape[0]
        out = self.backend.forward(q.view(t, self.num_heads, self.head_dim),
                                   k.view(t, self.num_kv_heads, self.head_dim),
                                   v.view(t, self.num_kv_heads, self.head_dim),
                                   self.key_cache, self.value_cache, metadata, self.scale)
        return out.reshape(t, self.num_heads * self.head_dim)
