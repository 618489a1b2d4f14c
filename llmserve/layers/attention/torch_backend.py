"""Paged attention in plain PyTorch: correct everywhere, and the fast path on CPU.

Decodes (one query token each) are batched into padded gather + SDPA calls: sequences of similar length
share one call, so a batch of mixed lengths (a few long conversations among many short ones) does not pad
every row to the longest context (see :func:`group_decodes_by_length`). Every other row (a fresh prompt, a
prefill chunk after cached context, a running sequence verifying 1 + k speculated tokens) goes through
``scaled_dot_product_attention`` one sequence at a time, causal within the chunk and over the whole cached
context before it.

Per-layer differences (:class:`AttentionSpec`) are handled at forward time. A sliding window changes which
keys a row sees: the metadata builds, the first time a layer with that window runs in the step, the
window's decode groups (only the blocks inside the window are gathered) and prefill masks, and keeps them
for the other layers with the same window; a window no shorter than the step's longest sequence is full
attention and shares its masks. A logit soft-cap (Gemma 2) and ALiBi biases (BLOOM, Falcon) cannot go
through SDPA without materialising a bias per head, so such layers compute the scores explicitly, a slice of
query rows at a time (:func:`explicit_attention`); other layers keep the SDPA path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmserve.layers.attention.alibi import alibi_slopes_tensor
from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec, BatchLayout, padded_block_tables
from llmserve.quantization.kv_cache import dequantize_kv, format_of, quantize_kv


@dataclass
class PrefillChunk:
    """A row with its own query tokens (any number) over its cached context."""

    query_start: int
    query_len: int
    context_len: int
    mask: torch.Tensor | None   # [query_len, seq_len - key_start] bool (True = attend); None: plain causal
    key_start: int = 0          # position of the first key gathered (a block boundary; > 0 only with a window)
    # The blocks holding keys key_start .. context_len + query_len - 1: None in the length-derived piece every
    # KV-cache group shares, set in each group's (:meth:`with_table`).
    block_table: torch.Tensor | None = None

    def with_table(self, table: np.ndarray, block_size: int, device: torch.device) -> PrefillChunk:
        """This chunk reading its keys from ``table`` (its row of a group's block tables)."""
        end = -(-(self.context_len + self.query_len) // block_size)
        blocks = torch.from_numpy(table[self.key_start // block_size:end]).to(device=device, dtype=torch.long)
        return dataclasses.replace(self, block_table=blocks)


@dataclass
class DecodeGroup:
    """Decodes of similar length attended in one padded call."""

    rows: torch.Tensor | None   # their indices among the step's decodes; None: all decodes, in order
    bias: torch.Tensor          # [B, 1, 1, max_blocks * block_size]: 0 or -inf (padding, outside the window)
    query_keys: torch.Tensor    # [B]: where each row's own token lies among its gathered keys (for ALiBi)
    row_ids: list[int]          # ``rows`` on the host
    first_block: list[int]      # each row's first block gathered (its window's)
    num_blocks: list[int]       # blocks each row gathers from there
    # [B, max_blocks]: None in the length-derived piece every KV-cache group shares, set in each group's.
    block_tables: torch.Tensor | None = None

    def with_tables(self, tables: np.ndarray, device: torch.device) -> DecodeGroup:
        """These rows gathering from ``tables`` (a group's block tables of the step's decodes), padded with 0."""
        padded = padded_block_tables([tables[row, first:first + count] for row, first, count
                                      in zip(self.row_ids, self.first_block, self.num_blocks)])
        return dataclasses.replace(self, block_tables=torch.from_numpy(padded).to(device=device, dtype=torch.long))


@dataclass
class TorchAttentionMetadata:
    """The step's batch; the decode groups and prefill chunks of each sliding window (None: full
    attention) are built on first use by :meth:`decodes_for` / :meth:`prefills_for` and cached.

    With several KV-cache groups each group has one (:meth:`for_group`): they share what the rows' lengths
    decide (masks, which blocks each row reads, its padding), built once per step for a window in ``shapes``,
    and each takes its own blocks from its block tables."""

    slot_mapping: torch.Tensor
    num_decodes: int
    layout: BatchLayout
    device: torch.device
    backend: TorchAttentionBackend
    max_seq_len: int
    shapes: dict[tuple[str, int | None], Any] = field(default_factory=dict)
    _decodes: dict[int | None, Any] = field(default_factory=dict)
    _prefills: dict[int | None, list[PrefillChunk]] = field(default_factory=dict)

    def window(self, sliding_window: int | None) -> int | None:
        """``sliding_window``, or None where it covers every sequence of the step (full attention)."""
        return sliding_window if sliding_window is not None and sliding_window < self.max_seq_len else None

    def for_group(self, block_tables: np.ndarray, slot_mapping: torch.Tensor) -> TorchAttentionMetadata:
        """The same step for a KV-cache group with these block tables and slots (on the device)."""
        layout = dataclasses.replace(self.layout, block_tables=block_tables, slot_mapping=slot_mapping)
        return TorchAttentionMetadata(slot_mapping, self.num_decodes, layout, self.device, self.backend,
                                      self.max_seq_len, self.shapes)

    def _shape(self, kind: str, window: int | None, build: Callable[[], Any]) -> Any:
        if (kind, window) not in self.shapes:
            self.shapes[kind, window] = build()
        return self.shapes[kind, window]

    def decodes_for(self, window: int | None) -> Any:
        """What ``_attend_decodes`` needs for this (normalised) window."""
        key = window if self.backend.decodes_depend_on_window else None
        if key not in self._decodes:
            shape = self._shape("decode", key, lambda: self.backend._decode_shape(self.layout, self.device, key))
            self._decodes[key] = self.backend._decode_tables(shape, self.layout, self.device)
        return self._decodes[key]

    def prefills_for(self, window: int | None) -> list[PrefillChunk]:
        if window not in self._prefills:
            layout, nd = self.layout, self.num_decodes
            shape = self._shape("prefill", window, lambda: self.backend._prefill_shape(layout, self.device, window))
            self._prefills[window] = [chunk.with_table(table, layout.block_size, self.device)
                                      for chunk, table in zip(shape, layout.block_tables[nd:])]
        return self._prefills[window]

    @property
    def decodes(self) -> Any:
        """Full attention's decode metadata."""
        return self.decodes_for(None)

    @property
    def prefills(self) -> list[PrefillChunk]:
        """Full attention's prefill chunks."""
        return self.prefills_for(None)


# Padding a decode row may carry in its group: this fraction of the group's longest context, or this many
# blocks, whichever is larger (short contexts are cheap to pad; each extra group costs a few kernel calls).
MAX_PADDING_FRACTION = 0.25
MIN_PADDING_BLOCKS = 8
# Explicit (soft-capped, ALiBi) attention materialises float32 scores: at most about this many at a time (query
# rows are taken in slices to stay under it).
MAX_SCORE_ELEMENTS = 1 << 24


def group_decodes_by_length(num_blocks: list[int]) -> list[list[int]]:
    """Partition decode rows (given as their context length in blocks) into groups whose padding to the
    group's longest row stays within ``MAX_PADDING_FRACTION`` (or ``MIN_PADDING_BLOCKS``). Rows are taken
    longest first, so a group is a run of similar lengths; the attention work of a step then stays within
    ~1.33x of the unpadded work however the lengths are spread, instead of growing with the longest row."""
    order = sorted(range(len(num_blocks)), key=lambda i: -num_blocks[i])
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        if not groups or longest - num_blocks[i] > max(MAX_PADDING_FRACTION * longest, MIN_PADDING_BLOCKS):
            groups.append([])
            longest = num_blocks[i]
        groups[-1].append(i)
    return groups


def window_start(position: int, window: int | None) -> int:
    """The first key position a query at ``position`` sees (transformers' ``sliding_window_overlay``:
    keys ``j`` with ``position - window < j <= position``)."""
    return 0 if window is None else max(0, position - window + 1)


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None, is_causal: bool, scale: float, soft_cap: float | None = None,
                       alibi_slopes: torch.Tensor | None = None,
                       query_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with the scores written out, in float32: scaled, then Gemma 2's logit soft-cap
    (``soft_cap * tanh(scores / soft_cap)``) when given, then ALiBi biases ``slope * (key - query)`` when
    ``alibi_slopes`` [H] are given, then the mask. ``query`` [B, H, Q, D], ``key``/``value`` [B, KV, L, D]
    (GQA when KV < H); ``attn_mask`` a bool keep-mask [Q, L] or an additive [B, 1, 1, L] bias; ``is_causal``
    (with no mask) for Q == L. Query row ``i`` of batch row ``b`` is key ``query_keys[b] + i`` (default: the
    last Q keys). Query rows go in slices so the scores stay under ``MAX_SCORE_ELEMENTS``."""
    b, h, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = h // kv_heads
    k = key.float().unsqueeze(2).transpose(-1, -2)   # [B, KV, 1, D, L]
    v = value.float().unsqueeze(2)                   # [B, KV, 1, L, D]
    if attn_mask is not None and attn_mask.dim() == 4:
        attn_mask = attn_mask.unsqueeze(1)           # [B, 1, 1, Q or 1, L] against [B, KV, G, Q, L]
    keys = torch.arange(k_len, device=query.device)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float().view(1, kv_heads, group, 1, 1)
        if query_keys is None:
            query_keys = torch.full((b,), k_len - q_len, device=query.device)
        query_keys = query_keys.view(b, 1, 1, 1, 1)
    out = torch.empty(b, h, q_len, d, dtype=query.dtype, device=query.device)
    step = max(1, MAX_SCORE_ELEMENTS // max(1, b * h * k_len))
    for q0 in range(0, q_len, step):
        q1 = min(q_len, q0 + step)
        q = query[:, :, q0:q1].float().reshape(b, kv_heads, group, q1 - q0, d)
        scores = torch.matmul(q, k).mul_(scale)
        if soft_cap is not None:
            scores = torch.tanh(scores.div_(soft_cap)).mul_(soft_cap)
        if alibi_slopes is not None:   # key - query, per batch row, query row and key: [B, 1, 1, Q, L]
            distance = keys - (query_keys + torch.arange(q0, q1, device=query.device).view(1, 1, 1, -1, 1))
            scores.add_(alibi_slopes * distance)
        if is_causal:
            rows = torch.arange(q0, q1, device=query.device) + (k_len - q_len)
            scores.masked_fill_(keys[None, :] > rows[:, None], float("-inf"))
        elif attn_mask is not None:
            mask = attn_mask[..., q0:q1, :] if attn_mask.shape[-2] > 1 else attn_mask
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, float("-inf"))
            else:
                scores.add_(mask)
        out[:, :, q0:q1] = torch.matmul(scores.softmax(-1), v).reshape(b, h, q1 - q0, d)
    return out


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
               is_causal: bool, spec: AttentionSpec, query_keys: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA, or :func:`explicit_attention` for a layer with a soft-cap or ALiBi slopes. Shapes as SDPA's;
    ``query_keys`` as :func:`explicit_attention` takes it."""
    if spec.logits_soft_cap is not None or spec.alibi_slopes is not None:
        return explicit_attention(query, key, value, attn_mask, is_causal, spec.scale, spec.logits_soft_cap,
                                  alibi_slopes_tensor(spec, query.device), query_keys)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=spec.scale, enable_gqa=query.shape[1] != key.shape[1])


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


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_quantized_kv_cache = True
    # Whether the decode metadata differs per sliding window (here: the groups gather only the window's
    # blocks); a backend whose decode kernel takes the window as an argument shares one.
    decodes_depend_on_window = True

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype   # of the additive decode mask: SDPA wants it to match the queries

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchAttentionMetadata:
        return TorchAttentionMetadata(layout.slot_mapping, layout.num_decodes, layout, device, self,
                                      max(layout.seq_lens, default=0))

    def metadata_for_group(self, metadata: TorchAttentionMetadata, block_tables: np.ndarray,
                           slot_mapping: torch.Tensor) -> TorchAttentionMetadata:
        return metadata.for_group(block_tables, slot_mapping)

    def _prefill_shape(self, layout: BatchLayout, device: torch.device, window: int | None) -> list[PrefillChunk]:
        """The prefill chunks as their lengths decide them (no block table yet)."""
        bs = layout.block_size
        nd = layout.num_decodes
        chunks = []
        start = nd
        for q_len, ctx in zip(layout.query_lens[nd:], layout.context_lens[nd:]):
            seq_len = ctx + q_len
            # Keys before the first query's window are never seen: gather from that block on.
            key_start = 0 if ctx == 0 else window_start(ctx, window) // bs * bs
            mask = None
            if ctx or (window is not None and window < q_len):
                q_pos = torch.arange(ctx, seq_len, device=device)[:, None]
                k_pos = torch.arange(key_start, seq_len, device=device)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
            chunks.append(PrefillChunk(start, q_len, ctx, mask, key_start))
            start += q_len
        return chunks

    def _decode_shape(self, layout: BatchLayout, device: torch.device, window: int | None) -> list[DecodeGroup]:
        """The decode groups as the rows' lengths decide them (no block tables yet)."""
        bs = layout.block_size
        nd = layout.num_decodes
        seq_lens = [c + 1 for c in layout.context_lens[:nd]]
        # Each row gathers the blocks that hold its window: from first_block, keys first_block * bs + j for
        # lo <= j < hi.
        first = [window_start(n - 1, window) // bs for n in seq_lens]
        blocks = [(n + bs - 1) // bs - f for n, f in zip(seq_lens, first)]
        lo = [window_start(n - 1, window) - f * bs for n, f in zip(seq_lens, first)]
        hi = [n - f * bs for n, f in zip(seq_lens, first)]
        partition = group_decodes_by_length(blocks)
        return [self._decode_group(rows, [lo[i] for i in rows], [hi[i] for i in rows], [first[i] for i in rows],
                                   [blocks[i] for i in rows], bs, device,
                                   in_order=len(partition) == 1 and rows == sorted(rows))
                for rows in partition]

    def _decode_group(self, rows: list[int], lo: list[int], hi: list[int], first: list[int], blocks: list[int],
                      bs: int, device: torch.device, in_order: bool) -> DecodeGroup:
        max_blocks = max(blocks)
        positions = torch.arange(max_blocks * bs, device=device)[None, :]
        ends = torch.tensor(hi, device=device)
        outside = positions >= ends[:, None]
        if any(lo):
            outside |= positions < torch.tensor(lo, device=device)[:, None]
        bias = torch.zeros(len(rows), 1, 1, max_blocks * bs, dtype=self.dtype, device=device)
        bias.masked_fill_(outside.view(len(rows), 1, 1, -1), float("-inf"))
        return DecodeGroup(None if in_order else torch.tensor(rows, dtype=torch.long, device=device), bias, ends - 1,
                           rows, first, blocks)

    def _decode_tables(self, shape: list[DecodeGroup], layout: BatchLayout, device: torch.device) -> list[DecodeGroup]:
        """The decode groups of ``shape`` reading ``layout``'s block tables."""
        tables = layout.block_tables[:layout.num_decodes]
        return [group.with_tables(tables, device) for group in shape]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: TorchAttentionMetadata,
                spec: AttentionSpec, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        # One cache for both (latent attention): the values are the keys, stored and gathered once.
        shared = value_cache is key_cache
        cache = KVCacheView(key_cache, value_cache, kv_scales, query.dtype)
        key, value = cache.store(key, value, metadata.slot_mapping)
        out = torch.empty_like(query)
        window = metadata.window(spec.sliding_window)
        nd = metadata.num_decodes
        if nd:
            self._attend_decodes(query[:nd], cache, metadata.decodes_for(window), spec, window, out[:nd])
        if len(metadata.layout.query_lens) == nd:
            return out
        for chunk in metadata.prefills_for(window):
            end = chunk.query_start + chunk.query_len
            q = query[chunk.query_start:end].transpose(0, 1).unsqueeze(0)
            if chunk.context_len == 0:
                k, v = key[chunk.query_start:end], value[chunk.query_start:end]
            else:
                num_keys = chunk.context_len + chunk.query_len - chunk.key_start
                k = cache.gather_keys(chunk.block_table).view(-1, num_kv_heads, head_dim)[:num_keys]
                v = k if shared else cache.gather_values(chunk.block_table).view(-1, num_kv_heads,
                                                                                 head_dim)[:num_keys]
            o = _attention(q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), chunk.mask,
                           chunk.mask is None, spec)
            out[chunk.query_start:end] = o[0].transpose(0, 1)
        return out

    def _attend_decodes(self, query: torch.Tensor, cache: KVCacheView, groups: list[DecodeGroup],
                        spec: AttentionSpec, window: int | None, out: torch.Tensor) -> None:
        """Attend the decode rows (one query token each) and write them into ``out``. ``groups`` were
        built for ``window`` (the spec's, or None where it covers the whole step)."""
        for group in groups:
            if group.rows is None:
                out.copy_(self._decode(query, cache, group, spec))
            else:
                q = query.index_select(0, group.rows)
                out.index_copy_(0, group.rows, self._decode(q, cache, group, spec))

    @staticmethod
    def _decode(query: torch.Tensor, cache: KVCacheView, group: DecodeGroup, spec: AttentionSpec) -> torch.Tensor:
        """One query token per sequence: gather each sequence's blocks (padded to the group's longest) with
        one ``index_select`` and attend in one SDPA call; the [B, L, KV, D] -> [B, KV, L, D] transpose stays a
        view (SDPA's CPU kernel reads strided K/V), so the gather is the only copy of the context."""
        b, num_heads, head_dim = query.shape
        num_kv_heads = cache.key_cache.shape[2]
        flat_tables = group.block_tables.view(-1)
        k = cache.gather_keys(flat_tables).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        v = (k if cache.shared
             else cache.gather_values(flat_tables).view(b, -1, num_kv_heads, head_dim).transpose(1, 2))
        out = _attention(query.unsqueeze(2), k, v, group.bias, False, spec, group.query_keys)
        return out.view(b, num_heads, head_dim)
