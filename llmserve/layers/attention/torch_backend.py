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
query rows at a time (:mod:`llmserve.layers.attention.explicit_attention`); other layers keep the SDPA path.
"""

from __future__ import annotations

import numpy as np
import torch

from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec, BatchLayout
from llmserve.layers.attention.explicit_attention import attention
from llmserve.layers.attention.torch_kv_cache import KVCacheView
from llmserve.layers.attention.torch_metadata import (DecodeGroup, PrefillChunk, TorchAttentionMetadata,
                                                      group_decodes_by_length, window_start)


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
            o = attention(q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), chunk.mask,
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
        out = attention(query.unsqueeze(2), k, v, group.bias, False, spec, group.query_keys)
        return out.view(b, num_heads, head_dim)
