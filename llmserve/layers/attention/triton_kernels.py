"""Triton kernels for paged attention, and thin launch wrappers.

Layouts (all row-major):

- ``query`` ``[T, H, D]`` and ``key``/``value`` ``[T, KV, D]``; the last dimension must be contiguous, the
  others may be strided (views of a fused QKV projection are fine);
- caches ``[num_blocks, block_size, KV, D]``, contiguous within each block; blocks may lie further apart (a
  cache tensor shared by layers of different shapes pads each block's page: :mod:`llmserve.worker.kv_cache_pages`);
- ``slot_mapping`` ``[T]`` int64: flat slot ``block * block_size + offset`` of each token's K/V. A
  **negative slot means "padding": that token's K/V are not stored** (CUDA-graph replays pad a decode
  batch up to a captured size and give the padded rows slot -1);
- block tables ``[num_seqs, max_blocks]`` int32, padded with any valid block id (entries past a
  sequence's length are never read).

Kernels:

- :func:`store_kv`: one program per token copies its K and V into the cache slot;
- :func:`prefill_attention`: flash attention over the paged cache for prefill chunks (any number of
  query tokens per sequence). Grid ``(sequence, query tile, KV head)``: with grouped-query attention the
  ``G = H / KV`` query heads of a KV head all attend to the same K/V, so one program takes them together
  and each K/V tile it loads serves all ``G`` heads (a grid over query heads loads every K/V tile ``G``
  times). Its query tile is ``PREFILL_BLOCK_M`` rows, ``PREFILL_BLOCK_M // G`` tokens times their ``G``
  heads flattened token-major (:func:`prefill_tile`); a ``G`` that does not divide the rows (3 of a
  12/4-head model) leaves a few masked padding rows. Each program walks the KV blocks of its sequence up to
  the causal frontier of its tile with an online softmax (running max and sum in float32, accumulator in
  float32). A chunk's own K/V are read back from the cache, where :func:`store_kv` has just put them, so
  the cached context and the chunk are one causal range;
- :func:`decode_attention`: one query token per sequence, flash-decoding: the context is split into
  ``num_splits`` ranges processed by separate programs (grid ``(sequence, KV head, split)``); each program
  handles all query heads of its KV head (GQA), so K/V are read once per KV head. Each split writes an
  unnormalised partial output plus its running max and sum; a reduce kernel combines the splits.

Block sizes: any ``block_size >= 1`` works (K/V rows are gathered per token through the block table, so a
kernel tile may span several cache blocks or part of one). ``head_dim`` may be any size; it is padded to
a power of two (at least 16) inside the kernels. ``tl.dot`` needs tiles of at least 16 in every
dimension, so decode pads the per-KV-head group of query heads to 16 rows (a prefill tile has at least
``PREFILL_BLOCK_M`` rows).

Per-layer options: a sliding window (``window`` > 0: a query at position ``p`` sees keys ``p - window < j
<= p``, as transformers' ``sliding_window_overlay``) and a logit soft-cap (``soft_cap`` > 0: Gemma 2's
``cap * tanh(scores / cap)`` on the scaled scores). The prefill kernel starts each tile's key walk at the
window of its first query and masks per row; decode splits the window ``[seq_len - window, seq_len)``
instead of the whole context, so no program reads a key outside it. ALiBi (``alibi_slopes``, one per query
head: BLOOM, Falcon) adds ``slope * (key_position - query_position)`` to the (capped) scores of each tile.
All three are compile-time switches (``USE_WINDOW``, ``SOFT_CAP``, ``USE_ALIBI``): layers without them run
the same code as before.

float16, bfloat16 and float32 inputs are supported; scores, softmax statistics and accumulators are
float32 in every case (float32 inputs use exact IEEE dot products, so they can be checked against a
float64 reference).

Quantised caches (``KV_FORMAT``, a compile-time switch: int8, or float8 e4m3 / e5m2 passed as their bytes) are
converted in registers as each K/V tile is loaded (:func:`_dequantize`: exact in the queries' dtype), and the
per-tensor scales (``kv_scales``, a float32 [2] device tensor read inside the kernels, so a CUDA graph sees
its current values) multiply the scores (K) and the output (V). The step's new K/V are quantised by
:func:`llmserve.quantization.kv_cache.quantize_kv` before :func:`store_kv` copies them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from llmserve.quantization.kv_cache import format_of, quantize_kv

# Whether the kernels below are defined for the Triton interpreter (``@triton.jit`` decides when it runs).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED and type(tl.zeros).__name__ == "JITFunction":
    # triton.language's own jitted helpers (tl.zeros, tl.cdiv, ...) were defined for the compiler: the
    # interpreter would fail inside every kernel with "Cannot call @triton.jit'd outside of the scope of a kernel".
    raise ImportError("TRITON_INTERPRET=1 was set after triton had been imported; set it before the first "
                      "`import triton` of the process")

# Tile sizes. Small enough that the Triton interpreter (CPU tests) stays fast, large enough for GPUs.
# Prefill tiles are PREFILL_BLOCK_M query rows (tokens x the query heads of one KV head) by PREFILL_BLOCK_N
# keys, on PREFILL_NUM_WARPS warps: for 16-bit inputs with head_dim 64 or 128 and GQA ratios 1-8 that
# compiles for sm_80 and sm_90 without register spills (ptxas -v; 64 rows on 4 warps, or 128 rows on 8,
# spill at head_dim 128). float32 inputs (tests) spill at head_dim 128, as they did with 32-row tiles.
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 32
PREFILL_NUM_WARPS = 8
DECODE_BLOCK_N = 32
MAX_DECODE_SPLITS = 64
# A split shorter than this many tokens is not worth its own program.
MIN_TOKENS_PER_SPLIT = 256


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))


def prefill_tile(group: int) -> tuple[int, int]:
    """``(rows, tokens)`` of a :func:`prefill_attention` query tile for ``group`` query heads per KV head:
    ``tokens`` whole query tokens times their ``group`` heads fill ``rows``, a power of two (``tl.arange``
    and ``tl.dot`` need one), :data:`PREFILL_BLOCK_M` unless one token's heads need more. The
    ``rows - tokens * group`` rows left over (a group of 3 uses 63 of 64) are masked padding."""
    rows = _pow2_at_least(group, PREFILL_BLOCK_M)
    return rows, rows // group


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


# KV_FORMAT codes: a cache of the model's dtype, int8, float8 e4m3 (bytes), float8 e5m2 (bytes).
KV_PLAIN, KV_INT8, KV_FP8_E4M3, KV_FP8_E5M2 = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _fp8_to_float(x, M_BITS: tl.constexpr, BIAS: tl.constexpr):
    """float8 bytes (sign, exponent, ``M_BITS`` mantissa bits, exponent bias ``BIAS``) as float32: the fields
    move into float32's with the bias changed (exact for normal numbers); a subnormal (exponent field 0) then
    reads as 2^-BIAS (1 + m 2^-M_BITS) where it means 2 (that - 2^-BIAS). NaN / infinity codes are never written."""
    x = x.to(tl.int32)
    mag = x & 0x7F
    v = ((mag << (23 - M_BITS)) + ((127 - BIAS) << 23)).to(tl.float32, bitcast=True)
    v = tl.where((mag >> M_BITS) == 0, (v - tl.exp2(-BIAS * 1.0)) * 2.0, v)
    return tl.where((x & 0x80) != 0, -v, v)


@triton.jit
def _dequantize(x, dtype, KV_FORMAT: tl.constexpr):
    """A loaded K/V tile as ``dtype`` (the queries'), unscaled: exact, since int8 and float8 values are
    representable in float16, bfloat16 and float32."""
    if KV_FORMAT == 1:
        x = x.to(tl.float32)
    elif KV_FORMAT == 2:
        x = _fp8_to_float(x, 3, 7)
    elif KV_FORMAT == 3:
        x = _fp8_to_float(x, 2, 15)
    return x.to(dtype)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with a float32 accumulator. ``UPCAST`` (set only under the Triton interpreter for
    bfloat16, whose CPU emulation of ``tl.dot`` mishandles bfloat16 operands) multiplies the exact float32
    images of the operands instead, which gives the same products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _soft_cap(s, CAP: tl.constexpr):
    """``CAP * tanh(s / CAP)`` (any units: scores here are in log2 units, with ``CAP`` scaled to match),
    as ``sign(y) (1 - e) / (1 + e)`` with ``e = exp(-2 |y|)`` <= 1: no overflow, and within a few float32
    ulps of ``CAP`` (the Triton interpreter has no ``tanh``)."""
    y = s / CAP
    e = tl.exp2(tl.abs(y) * -2.8853900817779268)   # exp(-2 |y|) = 2^(-2 log2(e) |y|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t) * CAP


@triton.jit
def _attend_kv_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, offs_n, n_mask, keep, kv_head, offs_d,
                    d_mask, scale_log2, slopes, q_pos, stride_c_block, stride_c_slot, stride_c_head,
                    BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    SOFT_CAP: tl.constexpr, USE_ALIBI: tl.constexpr, MAY_BE_EMPTY: tl.constexpr,
                    KV_FORMAT: tl.constexpr):
    """One KV tile of flash attention, shared by prefill and decode: gather the tile's K/V rows through the
    block table, score the queries against them (``keep`` masks scores out), and fold the tile into the
    running max ``m_i``, sum ``l_i`` and unnormalised output ``acc`` (all float32).

    ``scale_log2`` includes a quantised cache's K scale; ``KV_FORMAT``: the caches' entries (see
    :func:`_dequantize`). ``SOFT_CAP`` (log2 units, 0 = none) caps the scores before the mask; with
    ``USE_ALIBI``, each row adds
    ``slopes`` (its head's, log2 units) times the distance from its query position ``q_pos`` to each key
    after the cap. ``MAY_BE_EMPTY``: a row may have
    no key kept in this tile nor before it (a sliding window that starts past the tile); its maximum stays
    -inf and it is left at zero instead of computing ``exp2(-inf - -inf)``."""
    blocks = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    kv_off = blocks * stride_c_block + (offs_n % BLOCK_SIZE) * stride_c_slot + kv_head * stride_c_head
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    if KV_FORMAT != 0:
        k = _dequantize(k, q.dtype, KV_FORMAT)
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
    if SOFT_CAP > 0:
        s = _soft_cap(s, SOFT_CAP)
    if USE_ALIBI:
        s = s + slopes[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)   # such a row's p and alpha are then exp2(-inf) = 0
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    if KV_FORMAT != 0:
        v = _dequantize(v, q.dtype, KV_FORMAT)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc


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
        m_i, l_i, acc = _attend_kv_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, offs_n, n_mask, keep,
                                        kv_head, offs_d, d_mask, scale_log2, slopes, q_pos, stride_c_block,
                                        stride_c_slot, stride_c_head, BLOCK_SIZE, PRECISION, UPCAST, SOFT_CAP,
                                        USE_ALIBI, USE_WINDOW, KV_FORMAT)
    if USE_WINDOW:
        l_i = tl.where(l_i > 0, l_i, 1.0)   # padding rows may have seen no key
    acc = acc * (v_scale / l_i[:, None])
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


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
        m_i, l_i, acc = _attend_kv_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, offs_n, n_mask,
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


# ---------------------------------------------------------------------------------------------- wrappers
def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # tf32 only matters for float32 inputs


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and INTERPRETED


def _layer_options(window: int | None, soft_cap: float | None, alibi_slopes: torch.Tensor | None,
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


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """The kernels address both caches with the key cache's strides."""
    shape = key_cache.shape
    if key_cache.dim() != 4 or key_cache.stride()[1:] != (shape[2] * shape[3], shape[3], 1) \
            or value_cache.shape != shape or value_cache.stride() != key_cache.stride():
        raise ValueError("KV caches must be [num_blocks, block_size, num_kv_heads, head_dim] tensors contiguous within "
                         "each block, keys and values strided alike")


def _kv_format(cache: torch.Tensor) -> int:
    """The ``KV_FORMAT`` code of a cache tensor."""
    fmt = format_of(cache)
    return KV_PLAIN if fmt is None else {"int8": KV_INT8, "fp8_e4m3": KV_FP8_E4M3, "fp8_e5m2": KV_FP8_E5M2}[fmt.name]


def _entries(cache: torch.Tensor) -> torch.Tensor:
    """A cache as the kernels address it: float8 entries as their bytes (decoded in :func:`_dequantize`)."""
    return cache.view(torch.uint8) if cache.dtype.is_floating_point and cache.element_size() == 1 else cache


def _scales_arg(key_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> torch.Tensor:
    """The kernels' ``kv_scales`` pointer: required for a quantised cache, never read otherwise."""
    if _kv_format(key_cache) == KV_PLAIN:
        return key_cache
    if kv_scales is None or kv_scales.shape != (2,) or kv_scales.dtype != torch.float32:
        raise ValueError("a quantised KV cache needs kv_scales: a float32 [2] tensor (K, V)")
    return kv_scales


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Write ``key``/``value`` ``[T, KV, D]`` into their cache slots; slots < 0 are skipped. A quantised cache
    stores ``key / kv_scales[0]`` and ``value / kv_scales[1]`` in its format."""
    _check_caches(key_cache, value_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    fmt = format_of(key_cache)
    if fmt is not None:
        scales = _scales_arg(key_cache, kv_scales)
        key, value = quantize_kv(key, scales[0], fmt), quantize_kv(value, scales[1], fmt)
        key, value, key_cache, value_cache = _entries(key), _entries(value), _entries(key_cache), _entries(value_cache)
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        BLOCK_SIZE=key_cache.shape[1], NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=_pow2_at_least(num_kv_heads), BLOCK_D=_pow2_at_least(head_dim))


def _attention_shapes(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
                      ) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
    """``query`` with a unit-stride last dim, and ``(heads, head_dim, kv_heads, block_size, group)``."""
    _check_caches(key_cache, value_cache)
    query = _last_dim_contiguous(query)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    return query, (num_heads, head_dim, num_kv_heads, block_size, num_heads // num_kv_heads)


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
    window_arg, use_window, cap, slopes, use_alibi = _layer_options(window, soft_cap, alibi_slopes, query)
    query, (num_heads, head_dim, num_kv_heads, block_size, group) = _attention_shapes(query, key_cache, value_cache)
    rows, tokens = prefill_tile(group)
    grid = (num_seqs, triton.cdiv(max_query_len, tokens), num_kv_heads)
    _prefill_attention_kernel[grid](
        query, _entries(key_cache), _entries(value_cache), out, block_tables, query_start, query_lens, context_lens,
        slopes, _scales_arg(key_cache, kv_scales), scale * math.log2(math.e), window_arg,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=_pow2_at_least(head_dim, 16), BLOCK_M=rows, BLOCK_N=PREFILL_BLOCK_N,
        PRECISION=_precision(query.dtype), UPCAST=_upcast(query.dtype), USE_WINDOW=use_window, SOFT_CAP=cap,
        USE_ALIBI=use_alibi, KV_FORMAT=_kv_format(key_cache), num_warps=PREFILL_NUM_WARPS)


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
    window_arg, use_window, cap, slopes, use_alibi = _layer_options(window, soft_cap, alibi_slopes, query)
    query, (num_heads, head_dim, num_kv_heads, block_size, group) = _attention_shapes(query, key_cache, value_cache)
    part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    part_m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    block_d = _pow2_at_least(head_dim, 16)
    _decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        query, _entries(key_cache), _entries(value_cache), block_tables, seq_lens, slopes,
        _scales_arg(key_cache, kv_scales), part_out, part_m, part_l,
        scale * math.log2(math.e), num_splits, window_arg,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_G=_pow2_at_least(group, 16),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N,
        PRECISION=_precision(query.dtype), UPCAST=_upcast(query.dtype), USE_WINDOW=use_window, SOFT_CAP=cap,
        USE_ALIBI=use_alibi, KV_FORMAT=_kv_format(key_cache))
    _decode_reduce_kernel[(batch, num_heads)](
        part_out, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_S=_pow2_at_least(num_splits), BLOCK_D=block_d)
