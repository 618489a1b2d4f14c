"""Decode attention: one query token per sequence, flash-decoding (the context split over several programs,
their partial results combined by a reduce kernel)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmserve.layers.attention.triton_kernels.attend_tile import attend_kv_tile, pow2_at_least
from llmserve.layers.attention.triton_kernels.launch import (attention_shapes, cache_entries, dot_precision,
                                                            kv_format_code, layer_options, needs_upcast, scales_arg)

DECODE_BLOCK_N = 32
MAX_DECODE_SPLITS = 64
# A split shorter than this many tokens is not worth its own program.
MIN_TOKENS_PER_SPLIT = 256


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      max_splits: int = MAX_DECODE_SPLITS, min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT) -> int:
    """How many programs share one (sequence, KV head) in :func:`decode_attention`.

    Enough to give every streaming multiprocessor about two programs when the batch alone does not, but
    never so many that a split covers fewer than ``min_tokens_per_split`` tokens of the longest context.
    A power of two, between 1 and ``max_splits``.
    """
    if num_seqs < 1 or num_kv_heads < 1:
        raise ValueError("num_seqs and num_kv_heads must be >= 1")
    programs = num_seqs * num_kv_heads
    wanted = -(-2 * max(num_sms, 1) // programs)
    useful = max(1, -(-max_seq_len // min_tokens_per_split))
    splits = min(wanted, useful, max_splits)
    return 1 if splits <= 1 else min(triton.next_power_of_2(splits), max_splits)


@triton.jit
def _decode_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, alibi_ptr, kv_scales_ptr,
        part_out_ptr, part_m_ptr, part_l_ptr,
        scale_log2, num_splits, window,
        stride_qt, stride_qh, stride_c_block, stride_c_slot, stride_c_head, stride_bt,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        USE_WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, USE_ALIBI: tl.constexpr, KV_FORMAT: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The keys attended: [first, seq_len), the last `window` of them under a sliding window.
    first = 0
    if USE_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    # Splits cover whole BLOCK_N tiles of that range; trailing splits of a short sequence are empty.
    split_len = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)   # every row is the sequence's last token
    slopes = tl.zeros([BLOCK_G], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=g_mask, other=0.0).to(tl.float32)

    v_scale = 1.0
    if KV_FORMAT != 0:
        scale_log2 = scale_log2 * tl.load(kv_scales_ptr).to(tl.float32)
        v_scale = tl.load(kv_scales_ptr + 1).to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # start < end: every tile has a valid key, so every row's maximum is finite.
        m_i, l_i, acc = attend_kv_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, offs_n, n_mask,
                                       n_mask[None, :], kv_head, offs_d, d_mask, scale_log2, slopes, q_pos,
                                       stride_c_block, stride_c_slot, stride_c_head, BLOCK_SIZE, PRECISION, UPCAST,
                                       SOFT_CAP, USE_ALIBI, False, KV_FORMAT)
    acc = acc * v_scale   # the split's sum of p * entry, in value units (the reduce only reweights splits)
    # Partials are [seq, head, split] (+ [HEAD_DIM] for the output); empty splits write (-inf, 0, 0).
    row = (seq.to(tl.int64) * NUM_HEADS + heads) * num_splits + split
    tl.store(part_m_ptr + row, m_i, mask=g_mask)
    tl.store(part_l_ptr + row, l_i, mask=g_mask)
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_m_ptr, part_l_ptr, out_ptr, num_splits,
                          stride_ot, stride_oh,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    row = (seq * NUM_HEADS + head) * num_splits + offs_s
    m = tl.load(part_m_ptr + row, mask=s_mask, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    # A sequence of length 0 (a padded CUDA-graph row) has no finite split: give it a zero output.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)   # empty splits (m = -inf) weigh 0
    part = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    num = tl.sum(part * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     out: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, num_splits: int,
                     scale: float, *, window: int | None = None, soft_cap: float | None = None,
                     alibi_slopes: torch.Tensor | None = None, kv_scales: torch.Tensor | None = None) -> None:
    """One query token per sequence (``query``/``out`` ``[B, H, D]``) over ``seq_lens[i]`` cached tokens
    (the last ``window`` of them with a sliding window), split into ``num_splits`` ranges per sequence and
    combined by a reduce kernel. The grid depends only on ``B`` and ``num_splits``, never on the lengths,
    so a CUDA graph can replay it."""
    batch = query.shape[0]
    if batch == 0:
        return
    window_arg, use_window, cap, slopes, use_alibi = layer_options(window, soft_cap, alibi_slopes, query)
    query, (num_heads, head_dim, num_kv_heads, block_size, group) = attention_shapes(query, key_cache, value_cache)
    part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    part_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    block_d = pow2_at_least(head_dim, 16)
    _decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        query, cache_entries(key_cache), cache_entries(value_cache), block_tables, seq_lens, slopes,
        scales_arg(key_cache, kv_scales), part_out, part_m, part_l,
        scale * math.log2(math.e), num_splits, window_arg,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_G=pow2_at_least(group, 16),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N,
        PRECISION=dot_precision(query.dtype), UPCAST=needs_upcast(query.dtype), USE_WINDOW=use_window,
        SOFT_CAP=cap, USE_ALIBI=use_alibi, KV_FORMAT=kv_format_code(key_cache))
    _decode_reduce_kernel[(batch, num_heads)](
        part_out, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_S=pow2_at_least(num_splits), BLOCK_D=block_d)
