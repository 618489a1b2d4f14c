"""The attention layer models use: holds its :class:`AttentionSpec` and its slice of the KV cache."""

from __future__ import annotations

import torch
from torch import nn

from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec


class Attention(nn.Module):
    # Whether the layer's values are read from its key cache (multi-head latent attention: the values are the
    # leading dims of each key), so it holds one cache tensor per token instead of two.
    values_in_key_cache: bool = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, *,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None,
                 alibi_slopes: tuple[float, ...] | None = None,
                 kv_cache_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        self.spec = AttentionSpec(num_heads, num_kv_heads, head_dim, scale, sliding_window=sliding_window,
                                  logits_soft_cap=logits_soft_cap, alibi_slopes=alibi_slopes,
                                  kv_cache_dtype=kv_cache_dtype)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = self.spec.scale
        # Bound by the model runner once the cache is allocated.
        self.backend: AttentionBackend | None = None
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)

    def extra_repr(self) -> str:
        spec = self.spec
        extra = "".join(f", {name}={getattr(spec, name)}" for name in ("sliding_window", "logits_soft_cap")
                        if getattr(spec, name) is not None)
        if spec.alibi_slopes is not None:
            extra += ", alibi"
        return f"heads={spec.num_heads}, kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim}{extra}"

    def kv_cache_elements_per_token(self) -> int:
        """Cache entries one token takes in this layer (what sizes the KV cache and the concurrency it holds)."""
        return (1 if self.values_in_key_cache else 2) * self.num_kv_heads * self.head_dim

    def new_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed key and value caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` (one tensor twice
        where :attr:`values_in_key_cache`)."""
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        key_cache = torch.zeros(shape, dtype=dtype, device=device)
        return key_cache, key_cache if self.values_in_key_cache else torch.zeros(shape, dtype=dtype, device=device)

    def bind_cache(self, backend: AttentionBackend, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        if self.spec.kv_cache_dtype != "auto" and key_cache.numel() \
                and key_cache.dtype != getattr(torch, self.spec.kv_cache_dtype):
            raise NotImplementedError(f"this layer's KV cache must be {self.spec.kv_cache_dtype}, got a "
                                      f"{key_cache.dtype} cache")
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
                                   self.key_cache, self.value_cache, metadata, self.spec)
        return out.reshape(t, self.num_heads * self.head_dim)
