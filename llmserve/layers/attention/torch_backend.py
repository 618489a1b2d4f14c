"""Paged attention in plain PyTorch: correct everywhere, and the fast path on CPU.

Decodes (one query token each) are batched into one padded gather + SDPA call per layer; prefill chunks
go through ``scaled_dot_product_attention`` one sequence at a time (a step holds few of them), causal
within the chunk and over the whole cached context before it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_block_tables: torch.Tensor | None   # [B, max_blocks]
    decode_bias: torch.Tensor | None           # [B, 1, 1, max_blocks * block_size]: 0 or -inf (padding)
    prefills: list[PrefillChunk]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype   # of the additive decode mask: SDPA wants it to match the queries

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchAttentionMetadata:
        bs = layout.block_size
        nd = layout.num_decodes
        decode_tables = decode_bias = None
        if nd:
            seq_lens = [c + 1 for c in layout.context_lens[:nd]]
            max_blocks = (max(seq_lens) + bs - 1) // bs
            tables = [t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in layout.block_tables[:nd]]
            decode_tables = torch.tensor(tables, dtype=torch.long, device=device)
            positions = torch.arange(max_blocks * bs, device=device)
            lens = torch.tensor(seq_lens, device=device)
            decode_bias = torch.zeros(nd, 1, 1, max_blocks * bs, dtype=self.dtype, device=device)
            decode_bias.masked_fill_((positions[None, :] >= lens[:, None]).view(nd, 1, 1, -1), float("-inf"))
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
        return TorchAttentionMetadata(layout.slot_mapping, nd, decode_tables, decode_bias, prefills)

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
            out[:metadata.num_decodes] = self._decode(query[:metadata.num_decodes], key_cache, value_cache,
                                                      metadata, scale)
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

    @staticmethod
    def _decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                metadata: TorchAttentionMetadata, scale: float) -> torch.Tensor:
        """One query token per sequence: gather each sequence's blocks (padded to the longest) with one
        ``index_select`` and attend in one SDPA call; the [B, L, KV, D] -> [B, KV, L, D] transpose stays a
        view (SDPA's CPU kernel reads strided K/V), so the gather is the only copy of the context."""
        b, num_heads, head_dim = query.shape
        num_kv_heads = key_cache.shape[2]
        flat_tables = metadata.decode_block_tables.view(-1)
        k = key_cache.index_select(0, flat_tables).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        v = value_cache.index_select(0, flat_tables).view(b, -1, num_kv_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query.unsqueeze(2), k, v, attn_mask=metadata.decode_bias,
                                             scale=scale, enable_gqa=num_heads != num_kv_heads)
        return out.view(b, num_heads, head_dim)
