"""The attention layer models use: holds its :class:`AttentionSpec`, its slice of the KV cache and, for a
quantised cache, its K and V scales (:mod:`llmserve.quantization.kv_cache`)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec, KVCacheGroupMetadata
from llmserve.quantization.kv_cache import scale_for


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
        # Bound by the model runner once the cache is allocated, with the KV-cache group whose block tables
        # the layer reads (llmserve.worker.kv_cache_groups).
        self.backend: AttentionBackend | None = None
        self.kv_cache_group = 0
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)
        # A quantised cache's scales (K, V): a buffer, so a CUDA graph reads their current values. Checkpoint
        # scales are loaded into it (:meth:`load_kv_scale`); an int8 cache without them is calibrated on the first
        # batch the model runner marks (:attr:`calibrate_kv_scales`).
        self.register_buffer("kv_scales", torch.ones(2, dtype=torch.float32), persistent=False)
        self.kv_scales_loaded = False
        self.calibrate_kv_scales = False

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

    def kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of this layer's cache tensors for a model running in ``model_dtype``."""
        fmt = self.spec.kv_format
        return model_dtype if fmt is None else fmt.dtype

    def set_kv_cache_dtype(self, kv_cache_dtype: str) -> None:
        """Apply the engine's ``--kv-cache-dtype`` (before the cache is allocated); ``auto`` keeps the layer's own."""
        if kv_cache_dtype != "auto":
            self.spec = dataclasses.replace(self.spec, kv_cache_dtype=kv_cache_dtype)

    def load_kv_scale(self, which: str, scale: torch.Tensor) -> None:
        """A checkpoint's ``k_scale``, ``v_scale`` or (older FP8 checkpoints) ``kv_scale`` for both."""
        if scale.numel() != 1 or not float(scale.float().reshape(())) > 0:
            raise ValueError(f"{which} must be one positive number, got {tuple(scale.shape)} {scale.flatten()[:4]}")
        rows = {"k_scale": [0], "v_scale": [1], "kv_scale": [0, 1]}[which]
        self.kv_scales[rows] = scale.float().reshape(())
        self.kv_scales_loaded = True

    def bind_cache(self, backend: AttentionBackend, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        fmt = self.spec.kv_format
        if key_cache.numel() and fmt is not None:
            if key_cache.dtype != fmt.dtype:
                raise NotImplementedError(f"this layer's KV cache must be {fmt.dtype}, got a {key_cache.dtype} cache")
            if not backend.supports_quantized_kv_cache:
                raise NotImplementedError(f"the {backend.name} attention backend cannot read a {fmt.name} KV cache; "
                                          f"use --kv-cache-dtype auto, or LLMSERVE_ATTENTION_BACKEND=torch")
        elif self.spec.kv_cache_dtype != "auto" and key_cache.numel() \
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
        if self.calibrate_kv_scales:
            self.calibrate(k, v)
        if isinstance(metadata, KVCacheGroupMetadata):
            metadata = metadata[self.kv_cache_group]
        out = self.backend.forward(q.view(t, self.num_heads, self.head_dim),
                                   k.view(t, self.num_kv_heads, self.head_dim),
                                   v.view(t, self.num_kv_heads, self.head_dim),
                                   self.key_cache, self.value_cache, metadata, self.spec, self.kv_scales)
        return out.reshape(t, self.num_heads * self.head_dim)

    def calibrate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fit the int8 cache's scales to this batch's K and V (vLLM's ``--calculate-kv-scales``), once."""
        fmt = self.spec.kv_format
        assert fmt is not None
        self.kv_scales[0] = scale_for(k, fmt)
        self.kv_scales[1] = scale_for(v, fmt)
        self.calibrate_kv_scales = False

    def needs_kv_calibration(self) -> bool:
        """An int8 cache whose scales the checkpoint did not give (float8's default of 1.0 needs none)."""
        fmt = self.spec.kv_format
        return fmt is not None and fmt.name == "int8" and not self.kv_scales_loaded


def set_kv_cache_dtype(model: nn.Module, kv_cache_dtype: str) -> None:
    """Apply the engine's ``--kv-cache-dtype`` to every attention layer of ``model`` (a target or its draft:
    both keep K/V in the same pool, so both in the same format)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_kv_cache_dtype(kv_cache_dtype)
