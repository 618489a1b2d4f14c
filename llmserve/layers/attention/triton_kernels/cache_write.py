"""Writing a step's new K/V into their cache slots (quantised first for an int8 / float8 cache)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import pow2_at_least
from llmserve.layers.attention.triton_kernels.launch import (cache_entries, check_caches, last_dim_contiguous,
                                                             scales_arg)
from llmserve.quantization.kv_cache import format_of, quantize_kv


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_c_block, stride_c_slot, stride_c_head,
                     BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    slots = tl.zeros([BLOCK_H, 1], dtype=tl.int64) + slot   # broadcast: the mask must be a tensor
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM) & (slots >= 0)
    dst = ((slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot + offs_h * stride_c_head
           + offs_d)
    k = tl.load(key_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    tl.store(key_cache_ptr + dst, k, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(value_cache_ptr + dst, v, mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Write ``key``/``value`` ``[T, KV, D]`` into their cache slots; slots < 0 are skipped. A quantised cache
    stores ``key / kv_scales[0]`` and ``value / kv_scales[1]`` in its format."""
    check_caches(key_cache, value_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    fmt = format_of(key_cache)
    if fmt is not None:
        scales = scales_arg(key_cache, kv_scales)
        key, value = quantize_kv(key, scales[0], fmt), quantize_kv(value, scales[1], fmt)
        key, value = cache_entries(key), cache_entries(value)
        key_cache, value_cache = cache_entries(key_cache), cache_entries(value_cache)
    key, value = last_dim_contiguous(key), last_dim_contiguous(value)
    _store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        BLOCK_SIZE=key_cache.shape[1], NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=pow2_at_least(num_kv_heads), BLOCK_D=pow2_at_least(head_dim))
