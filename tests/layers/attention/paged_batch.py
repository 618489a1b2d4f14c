"""A batch of sequences over a paged KV cache, for the attention-backend tests: what they all set up."""

from __future__ import annotations

import random

import torch

from llmserve.layers.attention.backend import BatchLayout


class PagedBatch:
    """Sequences given as (cached context, new tokens), their K/V laid out in a paged cache on shuffled
    blocks; the contexts' K/V are already in the cache, the new tokens' are not. Everything is on the CPU
    (tests move what they need)."""

    def __init__(self, seqs, block_size, num_heads, num_kv_heads, head_dim, dtype=torch.float32, seed=0,
                 num_blocks=None, query_scale=1.0):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.seqs, self.block_size = seqs, block_size
        needed = sum(-(-(c + n) // block_size) for c, n in seqs)
        num_blocks = num_blocks or needed + 7
        self.key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        self.value_cache = torch.zeros_like(self.key_cache)
        free = list(range(num_blocks))
        rng.shuffle(free)
        self.tables, self.full_k, self.full_v, slots, self.queries = [], [], [], [], []
        for ctx, n in seqs:
            total = ctx + n
            table = [free.pop() for _ in range(-(-total // block_size))]
            k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
            v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
            pos = torch.arange(ctx)
            blocks = torch.tensor(table, dtype=torch.long)[pos // block_size] if ctx else pos
            self.key_cache[blocks, pos % block_size] = k[:ctx]
            self.value_cache[blocks, pos % block_size] = v[:ctx]
            slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, total)]
            self.queries.append((torch.randn(n, num_heads, head_dim, generator=gen) * query_scale).to(dtype))
            self.tables.append(table)
            self.full_k.append(k)
            self.full_v.append(v)
        self.query = torch.cat(self.queries)
        self.key = torch.cat([k[c:] for k, (c, _) in zip(self.full_k, seqs)])
        self.value = torch.cat([v[c:] for v, (c, _) in zip(self.full_v, seqs)])
        self.slots = torch.tensor(slots, dtype=torch.long)

    def batch_layout(self, num_decodes: int, device: torch.device | str = "cpu") -> BatchLayout:
        return BatchLayout(query_lens=[n for _, n in self.seqs], context_lens=[c for c, _ in self.seqs],
                           block_tables=self.tables, slot_mapping=self.slots.to(device), num_decodes=num_decodes,
                           block_size=self.block_size)
