"""The PyTorch paged-attention backend, and the CPU backend (its decodes through the compiled kernel),
against plain causal attention on contiguous K/V, on random block tables, odd lengths, GQA ratios, head
sizes and block sizes, for mixed decode + prefill batches whose decodes have very different context
lengths (the PyTorch backend attends them in several length groups; the kernel in one call)."""

from __future__ import annotations

import random

import pytest
import torch

from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec, BatchLayout
from llmserve.layers.attention.cpu_backend import CPUAttentionBackend
from llmserve.layers.attention.torch_backend import TorchAttentionBackend
from llmserve.layers.attention.torch_metadata import group_decodes_by_length
from llmserve.layers.cpu_kernels import cpu_kernels


def make_backend(name: str) -> AttentionBackend:
    if name == "torch":
        return TorchAttentionBackend(torch.float32)
    kernels = cpu_kernels()
    assert kernels is not None, "the test machine has a C compiler"
    return CPUAttentionBackend(kernels)


def reference_attention(q, k, v, context_len, scale):
    """q [Q, H, D] at positions context_len.., k/v [S, KV, D] for positions 0..S-1; causal."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k.double()) * scale
    q_pos = torch.arange(context_len, context_len + q.shape[0])[:, None]
    scores.masked_fill_(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 8), (4, 2, 8), (6, 1, 8), (12, 4, 64), (6, 2, 20)])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_batch_matches_reference(backend_name, block_size, num_heads, num_kv_heads, head_dim, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 2048
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
    backend = make_backend(backend_name)
    metadata = backend.build_metadata(layout, torch.device("cpu"))
    if backend_name == "torch":
        assert len(metadata.decodes) >= 2   # the long decodes are not padded with the short ones
    out = backend.forward(torch.cat(queries), torch.cat(new_k), torch.cat(new_v), key_cache, value_cache,
                          metadata, AttentionSpec(num_heads, num_kv_heads, head_dim, scale))
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


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_decode_only_batch_with_strided_queries(backend_name):
    """Queries come from a fused QKV projection: a strided view, not a contiguous tensor."""
    torch.manual_seed(3)
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 16, 4
    key_cache = torch.randn(64, block_size, num_kv_heads, head_dim)
    value_cache = torch.randn_like(key_cache)
    tables = [[5, 9, 1], [40], [7, 8]]
    lens = [11, 1, 6]   # tokens attended, the new one included
    qkv = torch.randn(3, (num_heads + 2 * num_kv_heads) * head_dim)
    query = qkv[:, :num_heads * head_dim].view(3, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(3, num_kv_heads, head_dim)
    value = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(3, num_kv_heads, head_dim)
    slots = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)]
    layout = BatchLayout(query_lens=[1, 1, 1], context_lens=[n - 1 for n in lens], block_tables=tables,
                         slot_mapping=torch.tensor(slots), num_decodes=3, block_size=block_size)
    backend = make_backend(backend_name)
    out = backend.forward(query, key, value, key_cache, value_cache,
                          backend.build_metadata(layout, torch.device("cpu")),
                          AttentionSpec(num_heads, num_kv_heads, head_dim, 0.25))
    for i, (table, n) in enumerate(zip(tables, lens)):
        k = key_cache[torch.tensor(table)].reshape(-1, num_kv_heads, head_dim)[:n]
        v = value_cache[torch.tensor(table)].reshape(-1, num_kv_heads, head_dim)[:n]
        torch.testing.assert_close(out[i:i + 1], reference_attention(query[i:i + 1], k, v, n - 1, 0.25),
                                   atol=1e-5, rtol=1e-4)
