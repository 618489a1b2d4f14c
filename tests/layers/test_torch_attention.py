"""The PyTorch paged-attention backend against plain causal attention on contiguous K/V, on random
block tables, odd lengths, GQA ratios and block sizes, for mixed decode + prefill batches whose decodes
have very different context lengths (so they are attended in several length groups)."""

from __future__ import annotations

import random

import pytest
import torch

from llmserve.layers.attention.backend import BatchLayout
from llmserve.layers.attention.torch_backend import TorchAttentionBackend, group_decodes_by_length


def reference_attention(q, k, v, context_len, scale):
    """q [Q, H, D] at positions context_len.., k/v [S, KV, D] for positions 0..S-1; causal."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k.double()) * scale
    q_pos = torch.arange(context_len, context_len + q.shape[0])[:, None]
    scores.masked_fill_(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_batch_matches_reference(block_size, num_heads, num_kv_heads, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    head_dim, num_blocks = 8, 2048
    scale = head_dim ** -0.5
    # (context already cached, new query tokens): decodes first, then prefill chunks with and without context.
    decode_contexts = [rng.randint(1, 40), rng.randint(300, 400), rng.randint(1, 10), rng.randint(120, 160)]
    seqs = [(c, 1) for c in decode_contexts] + [(0, rng.randint(1, 23)), (rng.randint(1, 30), rng.randint(2, 9))]
    key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = torch.zeros_like(key_cache)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, full_k, full_v, slots, queries, new_k, new_v = [], [], [], [], [], [], []
    for ctx, n in seqs:
        total = ctx + n
        table = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        k = torch.randn(total, num_kv_heads, head_dim)
        v = torch.randn(total, num_kv_heads, head_dim)
        full_k.append(k)
        full_v.append(v)
        for pos in range(ctx):   # the cached context, written as earlier steps would have
            key_cache[table[pos // block_size], pos % block_size] = k[pos]
            value_cache[table[pos // block_size], pos % block_size] = v[pos]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, total)]
        queries.append(torch.randn(n, num_heads, head_dim))
        new_k.append(k[ctx:])
        new_v.append(v[ctx:])
    layout = BatchLayout(query_lens=[n for _, n in seqs], context_lens=[c for c, _ in seqs], block_tables=tables,
                         slot_mapping=torch.tensor(slots), num_decodes=4, block_size=block_size)
    backend = TorchAttentionBackend(torch.float32)
    metadata = backend.build_metadata(layout, torch.device("cpu"))
    assert len(metadata.decode_groups) >= 2   # the long decodes are not padded with the short ones
    out = backend.forward(torch.cat(queries), torch.cat(new_k), torch.cat(new_v), key_cache, value_cache,
                          metadata, scale)
    start = 0
    for (ctx, n), q, k, v in zip(seqs, queries, full_k, full_v):
        expected = reference_attention(q, k, v, ctx, scale)
        torch.testing.assert_close(out[start:start + n], expected, atol=1e-5, rtol=1e-4)
        start += n
    # The new tokens' K/V landed in their slots.
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    torch.testing.assert_close(flat_k[torch.tensor(slots)], torch.cat(new_k))


def test_decode_groups_bound_padding_and_cover_every_row():
    rng = random.Random(0)
    lengths = [rng.choice([1, 2, 3, 50, 51, 60, 200, 130]) for _ in range(64)]
    groups = group_decodes_by_length(lengths)
    assert sorted(i for g in groups for i in g) == list(range(64))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert all(longest - lengths[i] <= max(0.25 * longest, 8) for i in group)
    assert len(groups) <= 5
    assert group_decodes_by_length([7] * 10) == [list(range(10))]   # equal lengths: one call, in order
    assert group_decodes_by_length([]) == []
