"""Paged attention in plain PyTorch: correct everywhere, and the fast path on CPU.

Decodes (one query token each) are batched into padded gather + SDPA calls: sequences of similar length
share one call, so a batch of mixed lengths (a few long conversations among many short ones) does not pad
every row to the longest context (see :func:`group_decodes_by_length`). Prefill chunks go through
``scaled_dot_product_attention`` one sequence at a time (a step holds few of them), causal within the
chunk and over the whole cached context before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmserve.layers.attention.backend import AttentionBackend, BatchLayout


@dataclass
class PrefillChunk:
    query_start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor   # blocks covering context_len + query_len tokens
    mask: torch.Tensor | None   # [query_len, seq_len] bool (True = attend); None when there is no context


@dataclass
class DecodeGroup:
    """Decodes of similar length attended in one padded call."""

    rows: torch.Tensor | None   # their indices among the step's decodes; None: all decodes, in order
    block_tables: torch.Tensor  # [B, max_blocks]
    bias: torch.Tensor          # [B, 1, 1, max_blocks * block_size]: 0 or -inf (padding)


@dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decodes: Any                 # what ``_attend_decodes`` needs: here a list of DecodeGroup
    prefills: list[PrefillChunk]


# Padding a decode row may carry in its group: this fraction of the group's longest context, or this many
# blocks, whichever is larger (short contexts are cheap to pad; each extra group costs a few kernel calls).
MAX_PADDING_FRACTION = 0.25
MIN_PADDING_BLOCKS = 8


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


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype   # of the additive decode mask: SDPA wants it to match the queries

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchAttentionMetadata:
        bs = layout.block_size
        nd = layout.num_decodes
        decodes = self._decode_metadata(layout, device) if nd else None
        prefills = []
        start = nd
        for q_len, ctx, table in zip(layout.query_lens[nd:], layout.context_lens[nd:], layout.block_tables[nd:]):
            seq_len = ctx + q_len
            num_blocks = (seq_len + bs - 1) // bs
            mask = None
            if ctx:
                q_pos = torch.arange(ctx, seq_len, device=device)
                mask = torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]
            prefills.append(PrefillChunk(start, q_len, ctx,
                                         torch.tensor(table[:num_blocks], dtype=torch.long, device=device), mask))
            start += q_len
        return TorchAttentionMetadata(layout.slot_mapping, nd, decodes, prefills)

    def _decode_metadata(self, layout: BatchLayout, device: torch.device) -> list[DecodeGroup]:
        bs = layout.block_size
        seq_lens = [c + 1 for c in layout.context_lens[:layout.num_decodes]]
        blocks = [(n + bs - 1) // bs for n in seq_lens]
        partition = group_decodes_by_length(blocks)
        return [self._decode_group(rows, [seq_lens[i] for i in rows], [layout.block_tables[i] for i in rows], bs,
                                   device, in_order=len(partition) == 1 and rows == sorted(rows))
                for rows in partition]

    def _decode_group(self, rows: list[int], seq_lens: list[int], tables: list[list[int]], bs: int,
                      device: torch.device, in_order: bool) -> DecodeGroup:
        max_blocks = (max(seq_lens) + bs - 1) // bs
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables]
        positions = torch.arange(max_blocks * bs, device=device)
        lens = torch.tensor(seq_lens, device=device)
        bias = torch.zeros(len(rows), 1, 1, max_blocks * bs, dtype=self.dtype, device=device)
        bias.masked_fill_((positions[None, :] >= lens[:, None]).view(len(rows), 1, 1, -1), float("-inf"))
        return DecodeGroup(None if in_order else torch.tensor(rows, dtype=torch.long, device=device),
                           torch.tensor(padded, dtype=torch.long, device=device), bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: TorchAttentionMetadata,
                scale: float) -> torch.Tensor:
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        flat_k.index_copy_(0, metadata.slot_mapping, key)
        flat_v.index_copy_(0, metadata.slot_mapping, value)
        out = torch.empty_like(query)
        if metadata.num_decodes:
            self._attend_decodes(query[:metadata.num_decodes], key_cache, value_cache, metadata.decodes, scale,
                                 out[:metadata.num_decodes])
        for chunk in metadata.prefills:
            end = chunk.query_start + chunk.query_len
            q = query[chunk.query_start:end].transpose(0, 1).unsqueeze(0)
            if chunk.context_len == 0:
                k, v = key[chunk.query_start:end], value[chunk.query_start:end]
            else:
                seq_len = chunk.context_len + chunk.query_len
                k = key_cache.index_select(0, chunk.block_table).view(-1, num_kv_heads, head_dim)[:seq_len]
                v = value_cache.index_select(0, chunk.block_table).view(-1, num_kv_heads, head_dim)[:seq_len]
            o = F.scaled_dot_product_attention(
                q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale,
                enable_gqa=q.shape[1] != num_kv_heads)
            out[chunk.query_start:end] = o[0].transpose(0, 1)
        return out

    def _attend_decodes(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        groups: list[DecodeGroup], scale: float, out: torch.Tensor) -> None:
        """Attend the decode rows (one query token each) and write them into ``out``."""
        for group in groups:
            if group.rows is None:
                out.copy_(self._decode(query, key_cache, value_cache, group, scale))
            else:
                q = query.index_select(0, group.rows)
                out.index_copy_(0, group.rows, self._decode(q, key_cache, value_cache, group, scale))

    @staticmethod
    def _decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, group: DecodeGroup,
                scale: float) -> torch.Tensor:
        """One query token per sequence: gather each sequence's blocks (padded to the group's longest) with
        one ``index_select`` and attend in one SDPA call; the [B, L, KV, D] -> [B, KV, L, D] transpose stays a
        view (SDPA's CPU kernel reads strided K/V), so the gather is the only copy of the context."""
        b, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[2]
        flat_tables = group.block_tables.view(-1)
        k = key_cache.index_select(0, flat_tables).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        v = value_cache.index_select(0, flat_tables).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query.unsqueeze(2), k, v, attn_mask=group.bias,
                                             scale=scale, enable_gqa=num_heads != num_kv_heads)
        return out.view(b, num_heads, head_dim)
