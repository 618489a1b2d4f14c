"""An attention layer that reuses an earlier layer's K/V (Gemma 4's KV sharing) and holds no KV cache.

The model runner binds caches only to the layers a model lists in ``attention_layers()``; a
:class:`SharedKVAttention` is left out of that list and reads its source layer's cache and backend when it
runs, through its source's KV-cache group (:mod:`llmserve.worker.kv_cache_groups`), so it is correct whenever
the source's cache is (rebinding included). It is given the source layer's
K/V of this step, which the backend stores into the source's slots again: the same values into the same
slots, so every backend serves it through its ordinary path (prefill chunks that read this step's K/V
directly included) at the cost of one extra store. A quantised source cache is read with the source's scales
(the same values quantise to the same entries).
"""

from __future__ import annotations

import torch

from llmserve.layers.attention.backend import KVCacheGroupMetadata
from llmserve.layers.attention.layer import Attention


class SharedKVAttention(Attention):
    def __init__(self, source: Attention, num_heads: int, scale: float) -> None:
        spec = source.spec
        super().__init__(num_heads, spec.num_kv_heads, spec.head_dim, scale, sliding_window=spec.sliding_window,
                         logits_soft_cap=spec.logits_soft_cap, kv_cache_dtype=spec.kv_cache_dtype)
        self._source = (source,)   # a tuple, so the source is not registered twice as a submodule

    @property
    def source(self) -> Attention:
        return self._source[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", kv shared"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: object) -> torch.Tensor:
        """``k``/``v``: the source layer's K/V of this step (already in its cache)."""
        source = self.source
        assert source.backend is not None, "KV cache not allocated: call ModelRunner.allocate_kv_cache first"
        t = q.shape[0]
        if isinstance(metadata, KVCacheGroupMetadata):   # the source's KV-cache group: its tables hold the K/V
            metadata = metadata[source.kv_cache_group]
        out = source.backend.forward(q.view(t, self.num_heads, self.head_dim),
                                     k.view(t, self.num_kv_heads, self.head_dim),
                                     v.view(t, self.num_kv_heads, self.head_dim),
                                     source.key_cache, source.value_cache, metadata, self.spec, source.kv_scales)
        return out.reshape(t, self.num_heads * self.head_dim)
