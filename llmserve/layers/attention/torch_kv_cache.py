"""One layer's paged KV cache as the PyTorch attention paths read and write it (plain or quantised)."""

from __future__ import annotations

import torch

from llmserve.quantization.kv_cache import dequantize_kv, format_of, quantize_kv


class KVCacheView:
    """One layer's key and value caches as the PyTorch paths read and write them: a quantised cache (int8 /
    float8, told by its dtype) is written as ``x / scale`` and read back as ``entry * scale`` in the queries'
    dtype, only for the blocks gathered."""

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor, kv_scales: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        self.key_cache, self.value_cache, self.dtype = key_cache, value_cache, dtype
        self.shared = value_cache is key_cache
        self.format = format_of(key_cache)
        if self.format is not None:
            if kv_scales is None:
                raise ValueError(f"a {self.format.name} KV cache needs the layer's kv_scales")
            self.k_scale = kv_scales[0]
            self.v_scale = kv_scales[0] if self.shared else kv_scales[1]

    def store(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key``/``value`` [T, KV, D] into their slots; return them as the cache will give them back
        (a fresh prompt then attends what its later decodes will read)."""
        if self.format is None:
            self._copy(self.key_cache, key, slot_mapping)
            if not self.shared:
                self._copy(self.value_cache, value, slot_mapping)
            return key, value
        qk = quantize_kv(key, self.k_scale, self.format)
        self._copy(self.key_cache, qk, slot_mapping)
        key = dequantize_kv(qk, self.k_scale, self.dtype)
        if self.shared:
            return key, key
        qv = quantize_kv(value, self.v_scale, self.format)
        self._copy(self.value_cache, qv, slot_mapping)
        return key, dequantize_kv(qv, self.v_scale, self.dtype)

    @staticmethod
    def _copy(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        # index_copy_ has no float8 kernel: float8 entries are copied as their bytes.
        if cache.element_size() == 1 and cache.is_floating_point():
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        if cache.is_contiguous():
            cache.view(-1, *x.shape[1:]).index_copy_(0, slot_mapping, x)
        else:   # blocks a padded page apart (llmserve.worker.kv_cache_pages): address slots by block and offset
            block_size = cache.shape[1]
            cache.index_put_((slot_mapping // block_size, slot_mapping % block_size), x)

    def gather_keys(self, blocks: torch.Tensor) -> torch.Tensor:
        """The key blocks ``blocks`` [N] as [N, block_size, KV, D] in the queries' dtype."""
        k = self.key_cache.index_select(0, blocks)
        return k if self.format is None else dequantize_kv(k, self.k_scale, self.dtype)

    def gather_values(self, blocks: torch.Tensor) -> torch.Tensor:
        v = self.value_cache.index_select(0, blocks)
        return v if self.format is None else dequantize_kv(v, self.v_scale, self.dtype)
