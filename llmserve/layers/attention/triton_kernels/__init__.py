"""Triton kernels for paged attention, and thin launch wrappers, grouped by what they compute.

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

- :func:`store_kv` (:mod:`.cache_write`): one program per token copies its K and V into the cache slot;
- :func:`prefill_attention` (:mod:`.prefill`): flash attention over the paged cache for prefill chunks (any number of
  query tokens per sequence). Grid ``(sequence, query tile, KV head)``: with grouped-query attention the
  ``G = H / KV`` query heads of a KV head all attend to the same K/V, so one program takes them together
  and each K/V tile it loads serves all ``G`` heads (a grid over query heads loads every K/V tile ``G``
  times). Its query tile is ``PREFILL_BLOCK_M`` rows, ``PREFILL_BLOCK_M // G`` tokens times their ``G``
  heads flattened token-major (:func:`prefill_tile`); a ``G`` that does not divide the rows (3 of a
  12/4-head model) leaves a few masked padding rows. Each program walks the KV blocks of its sequence up to
  the causal frontier of its tile with an online softmax (running max and sum in float32, accumulator in
  float32). A chunk's own K/V are read back from the cache, where :func:`store_kv` has just put them, so
  the cached context and the chunk are one causal range;
- :func:`decode_attention` (:mod:`.decode`): one query token per sequence, flash-decoding: the context is split into
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
converted in registers as each K/V tile is loaded (:mod:`.attend_tile`: exact in the queries' dtype), and the
per-tensor scales (``kv_scales``, a float32 [2] device tensor read inside the kernels, so a CUDA graph sees
its current values) multiply the scores (K) and the output (V). The step's new K/V are quantised by
:func:`llmserve.quantization.kv_cache.quantize_kv` before :func:`store_kv` copies them.
"""

from llmserve.layers.attention.triton_kernels.cache_write import store_kv
from llmserve.layers.attention.triton_kernels.decode import (DECODE_BLOCK_N, MAX_DECODE_SPLITS, MIN_TOKENS_PER_SPLIT,
                                                             choose_num_splits, decode_attention)
from llmserve.layers.attention.triton_kernels.prefill import (PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_NUM_WARPS,
                                                              prefill_attention, prefill_tile)

__all__ = ["DECODE_BLOCK_N", "MAX_DECODE_SPLITS", "MIN_TOKENS_PER_SPLIT", "PREFILL_BLOCK_M", "PREFILL_BLOCK_N",
           "PREFILL_NUM_WARPS", "choose_num_splits", "decode_attention", "prefill_attention", "prefill_tile",
           "store_kv"]
