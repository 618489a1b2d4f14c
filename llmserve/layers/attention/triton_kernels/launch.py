"""Host-side launch arguments of the paged-attention kernels: checks of the caches and the layer's options,
and the compile-time switches a tensor's dtype selects."""

from __future__ import annotations

import math

import torch

from llmserve.layers.attention.triton_kernels.attend_tile import (INTERPRETED, KV_FP8_E4M3, KV_FP8_E5M2, KV_INT8,
                                                                  KV_PLAIN)
from llmserve.quantization.kv_cache import format_of


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # tf32 only matters for float32 inputs


def needs_upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and INTERPRETED


def layer_options(window: int | None, soft_cap: float | None, alibi_slopes: torch.Tensor | None,
                  query: torch.Tensor) -> tuple[int, bool, float, torch.Tensor, bool]:
    """``(window argument, USE_WINDOW, SOFT_CAP, slopes pointer, USE_ALIBI)`` for a layer: the cap and the
    slopes go in the kernels' log2 units (without ALiBi the query stands in as the never-read pointer)."""
    if window is not None and window < 1:
        raise ValueError(f"the sliding window must be >= 1 token (or None), got {window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"the logit soft-cap must be > 0 (or None), got {soft_cap}")
    if alibi_slopes is not None and alibi_slopes.shape != (query.shape[1],):
        raise ValueError(f"alibi_slopes must have one slope per query head ({query.shape[1]}), got "
                         f"{tuple(alibi_slopes.shape)}")
    slopes = query if alibi_slopes is None else (alibi_slopes.float() * math.log2(math.e)).contiguous()
    return (window or 0, window is not None, float(soft_cap) * math.log2(math.e) if soft_cap else 0.0, slopes,
            alibi_slopes is not None)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """The kernels address both caches with the key cache's strides."""
    shape = key_cache.shape
    if key_cache.dim() != 4 or key_cache.stride()[1:] != (shape[2] * shape[3], shape[3], 1) \
            or value_cache.shape != shape or value_cache.stride() != key_cache.stride():
        raise ValueError("KV caches must be [num_blocks, block_size, num_kv_heads, head_dim] tensors contiguous within "
                         "each block, keys and values strided alike")


def kv_format_code(cache: torch.Tensor) -> int:
    """The ``KV_FORMAT`` code of a cache tensor."""
    fmt = format_of(cache)
    return KV_PLAIN if fmt is None else {"int8": KV_INT8, "fp8_e4m3": KV_FP8_E4M3, "fp8_e5m2": KV_FP8_E5M2}[fmt.name]


def cache_entries(cache: torch.Tensor) -> torch.Tensor:
    """A cache as the kernels address it: float8 entries as their bytes (decoded in :mod:`.attend_tile`)."""
    return cache.view(torch.uint8) if cache.dtype.is_floating_point and cache.element_size() == 1 else cache


def scales_arg(key_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> torch.Tensor:
    """The kernels' ``kv_scales`` pointer: required for a quantised cache, never read otherwise."""
    if kv_format_code(key_cache) == KV_PLAIN:
        return key_cache
    if kv_scales is None or kv_scales.shape != (2,) or kv_scales.dtype != torch.float32:
        raise ValueError("a quantised KV cache needs kv_scales: a float32 [2] tensor (K, V)")
    return kv_scales


def attention_shapes(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
                     ) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
    """``query`` with a unit-stride last dim, and ``(heads, head_dim, kv_heads, block_size, group)``."""
    check_caches(key_cache, value_cache)
    query = last_dim_contiguous(query)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    return query, (num_heads, head_dim, num_kv_heads, block_size, num_heads // num_kv_heads)
