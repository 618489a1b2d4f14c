"""Prefill attention: flash attention of prefill chunks (any number of query tokens) over the paged cache."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import attend_kv_tile, pow2_at_least
from llmserve.layers.attention.triton_kernels.launch import (attention_shapes, cache_entries, dot_precision,
                                                            kv_format_code, layer_options, needs_upcast, scales_arg)

# Tile sizes. Small enough that the Triton interpreter (CPU tests) stays fast, large enough for GPUs.
# Prefill tiles are PREFILL_BLOCK_M query rows (tokens x the query heads of one KV head) by PREFILL_BLOCK_N
# keys, on PREFILL_NUM_WARPS warps: for 16-bit inputs with head_dim 64 or 128 and GQA ratios 1-8 that
# compiles for sm_80 and sm_90 without register spills (ptxas -v; 64 rows on 4 warps, or 128 rows on 8,
# spill at head_dim 128). float32 inputs (tests) spill at head_dim 128, as they did with 32-row tiles.
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 32
PREFILL_NUM_WARPS = 8


def prefill_tile(group: int) -> tuple[int, int]:
    """``(rows, tokens)`` of a :func:`prefill_attention` query tile for ``group`` query heads per KV head:
    ``tokens`` whole query tokens times their ``group`` heads fill ``rows``, a power of two (``tl.arange``
    and ``tl.dot`` need one), :data:`PREFILL_BLOCK_M` unless one token's heads need more. The
    ``rows - tokens * group`` rows left over (a group of 3 uses 63 of 64) are masked padding."""
    rows = pow2_at_least(group, PREFILL_BLOCK_M)
    return rows, rows // group


@triton.jit
def _prefill_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
        block_tables_ptr, query_start_ptr, query_lens_ptr, context_lens_ptr, alibi_ptr, kv_scales_ptr,
        scale_log2, window,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_c_block, stride_c_slot, stride_c_head, stride_bt,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, USE_ALIBI: tl.constexpr,
        KV_FORMAT: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    # The BLOCK_M query rows are BLOCK_M // GROUP query tokens x the GROUP query heads of this KV head,
    # token-major (row r is token r // GROUP, head r % GROUP; a token's heads are adjacent in memory), so
    # every K/V tile loaded serves all of them. The BLOCK_M % GROUP rows after the last whole token are padding.
    tile_tokens = BLOCK_M // GROUP
    q_len = tl.load(query_lens_ptr + seq)
    m0 = tile * tile_tokens
    if m0 >= q_len:   # this sequence has fewer query tiles than the longest one
        return
    q_start = tl.load(query_start_ptr + seq).to(tl.int64)
    context_len = tl.load(context_lens_ptr + seq)
    seq_len = context_len + q_len

    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows // GROUP   # query token of each row, within the chunk
    heads = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (rows < tile_tokens * GROUP) & (offs_m < q_len)
    d_mask = offs_d < HEAD_DIM
    q_rows = q_start + offs_m
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = context_len + offs_m   # absolute positions of this tile's queries
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=row_mask, other=0.0).to(tl.float32)

    v_scale = 1.0
    if KV_FORMAT != 0:
        scale_log2 = scale_log2 * tl.load(kv_scales_ptr).to(tl.float32)
        v_scale = tl.load(kv_scales_ptr + 1).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys past the last query of the tile are masked for every row: stop there.
    kv_end = tl.minimum(seq_len, context_len + m0 + tile_tokens)
    # Keys before the window of the tile's first query are masked for every row: start at that tile.
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(context_len + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(kv_start, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_end
        # Causal over the whole sequence. Without a window every row (padding included) sees key 0, so the
        # first iteration gives every row a finite maximum and no row ever computes exp2(-inf - -inf); with
        # one, a later row's window may start tiles later (MAY_BE_EMPTY guards it).
        keep = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if USE_WINDOW:
            keep = keep & (offs_n[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = attend_kv_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, offs_n, n_mask, keep,
                                       kv_head, offs_d, d_mask, scale_log2, slopes, q_pos, stride_c_block,
                                       stride_c_slot, stride_c_head, BLOCK_SIZE, PRECISION, UPCAST, SOFT_CAP,
                                       USE_ALIBI, USE_WINDOW, KV_FORMAT)
    if USE_WINDOW:
        l_i = tl.where(l_i > 0, l_i, 1.0)   # padding rows may have seen no key
    acc = acc * (v_scale / l_i[:, None])
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])



def prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      out: torch.Tensor, block_tables: torch.Tensor, query_start: torch.Tensor,
                      query_lens: torch.Tensor, context_lens: torch.Tensor, max_query_len: int,
                      scale: float, *, window: int | None = None, soft_cap: float | None = None,
                      alibi_slopes: torch.Tensor | None = None, kv_scales: torch.Tensor | None = None) -> None:
    """Causal attention of prefill chunks over the paged cache (which already holds their own K/V).

    ``query``/``out`` are ``[T, H, D]`` for the whole step; sequence ``i`` owns rows
    ``query_start[i] : query_start[i] + query_lens[i]`` at positions ``context_lens[i]`` onwards (any
    number of rows over any context). ``window``: a sliding window in tokens; ``soft_cap``: a logit cap;
    ``alibi_slopes``: [H] ALiBi slopes; ``kv_scales``: a quantised cache's K and V scales.
    """
    num_seqs = query_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return
    window_arg, use_window, cap, slopes, use_alibi = layer_options(window, soft_cap, alibi_slopes, query)
    query, (num_heads, head_dim, num_kv_heads, block_size, group) = attention_shapes(query, key_cache, value_cache)
    rows, tokens = prefill_tile(group)
    grid = (num_seqs, triton.cdiv(max_query_len, tokens), num_kv_heads)
    _prefill_attention_kernel[grid](
        query, cache_entries(key_cache), cache_entries(value_cache), out, block_tables, query_start, query_lens,
        context_lens, slopes, scales_arg(key_cache, kv_scales), scale * math.log2(math.e), window_arg,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=pow2_at_least(head_dim, 16), BLOCK_M=rows, BLOCK_N=PREFILL_BLOCK_N,
        PRECISION=dot_precision(query.dtype), UPCAST=needs_upcast(query.dtype), USE_WINDOW=use_window,
        SOFT_CAP=cap, USE_ALIBI=use_alibi, KV_FORMAT=kv_format_code(key_cache), num_warps=PREFILL_NUM_WARPS)
