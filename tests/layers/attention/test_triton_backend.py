"""The Triton attention kernels against plain PyTorch attention on contiguous K/V.

Without a GPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set by this folder's
conftest.py before triton is imported), so shapes are kept small. Every case uses shuffled,
non-contiguous block ids, odd lengths, GQA ratios 1, 2, 3, 4 and 8 (3 leaves padding rows in a prefill
tile), block sizes 1, 5, 16 and 32 (any block size works: the kernels gather K/V per token), head dims 64
and 128, mixed decode + prefill batches and contexts long enough to spread over several split-K programs.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")

from llmserve.layers.attention import triton_kernels as kernels
from llmserve.layers.attention.backend import AttentionSpec, get_attention_backend
from llmserve.layers.attention.torch_backend import TorchAttentionBackend
from llmserve.layers.attention.triton_backend import TritonAttentionBackend
from tests.layers.attention.paged_batch import PagedBatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real Triton compile)")

# Float32 kernels use IEEE dot products; half precision rounds P to the input dtype before P @ V.
TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def reference_attention(q, k, v, context_len, scale):
    """q [Q, H, D] at positions context_len.., k/v [S, KV, D] for positions 0..S-1; causal, float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k) * scale
    q_pos = torch.arange(context_len, context_len + q.shape[0], device=q.device)[:, None]
    scores.masked_fill_(torch.arange(k.shape[0], device=q.device)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


class Batch(PagedBatch):
    """A :class:`PagedBatch` on the test device, with its layer's spec and the reference output."""

    def __init__(self, seqs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed, num_blocks=None):
        super().__init__(seqs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed, num_blocks)
        self.scale = head_dim ** -0.5
        self.spec = AttentionSpec(num_heads, num_kv_heads, head_dim, self.scale)
        for name in ("key_cache", "value_cache", "query", "key", "value", "slots"):
            setattr(self, name, getattr(self, name).to(DEVICE))

    def layout(self, num_decodes):
        return self.batch_layout(num_decodes, DEVICE)

    def expected(self):
        out = []
        for (ctx, n), k, v, start in zip(self.seqs, self.full_k, self.full_v, self.query_starts()):
            q = self.query[start:start + n].cpu()
            out.append(reference_attention(q, k, v, ctx, self.scale))
        return torch.cat(out)

    def query_starts(self):
        starts, start = [], 0
        for _, n in self.seqs:
            starts.append(start)
            start += n
        return starts


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double(), atol=atol, rtol=rtol)


def int32(rows, device=DEVICE):
    return torch.tensor(rows, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------- store
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_slots_and_skips_padding(block_size, dtype):
    torch.manual_seed(0)
    num_blocks, kv_heads, head_dim = 8, 2, 64
    key_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    value_cache = torch.zeros_like(key_cache)
    slots = torch.randperm(num_blocks * block_size)[:7].tolist()
    slots[3] = -1   # a padded row: nothing stored
    # K/V as strided views of one fused projection output, like the model passes them.
    fused = torch.randn(7, 3 * kv_heads * head_dim, dtype=dtype, device=DEVICE)
    key = fused[:, :kv_heads * head_dim].view(7, kv_heads, head_dim)
    value = fused[:, kv_heads * head_dim:2 * kv_heads * head_dim].view(7, kv_heads, head_dim)
    kernels.store_kv(key, value, key_cache, value_cache, torch.tensor(slots, device=DEVICE))
    flat_k = key_cache.view(-1, kv_heads, head_dim)
    flat_v = value_cache.view(-1, kv_heads, head_dim)
    real = [i for i, s in enumerate(slots) if s >= 0]
    real_slots = torch.tensor([slots[i] for i in real], device=DEVICE)
    assert torch.equal(flat_k[real_slots], key[real])
    assert torch.equal(flat_v[real_slots], value[real])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[real_slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


# ---------------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", [
    (16, 4, 4, 64), (1, 4, 2, 64), (32, 4, 1, 128), (16, 8, 2, 128), (16, 12, 4, 64), (5, 8, 1, 64)])
def test_prefill_chunks_with_and_without_context(block_size, num_heads, num_kv_heads, head_dim):
    # Fresh prompt; chunk after a cached context that ends mid-block; a chunk over two query tiles and a bit
    # (a tile holds fewer tokens the more query heads share a KV head).
    _, tokens = kernels.prefill_tile(num_heads // num_kv_heads)
    seqs = [(0, 19), (37, 7), (21, 2 * tokens + 3)]
    batch = Batch(seqs, block_size, num_heads, num_kv_heads, head_dim, torch.float32, seed=block_size + head_dim)
    backend = TritonAttentionBackend(torch.float32)
    metadata = backend.build_metadata(batch.layout(num_decodes=0), DEVICE)
    out = backend.forward(batch.query, batch.key, batch.value, batch.key_cache, batch.value_cache, metadata,
                          batch.spec)
    assert_close(out, batch.expected(), torch.float32)
    # The chunks' own K/V were stored where the slot mapping says.
    flat_k = batch.key_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[batch.slots], batch.key)


def test_prefill_tile_packs_whole_tokens_into_power_of_two_rows():
    block_m = kernels.PREFILL_BLOCK_M
    assert kernels.prefill_tile(1) == (block_m, block_m)
    assert kernels.prefill_tile(3) == (block_m, block_m // 3)   # block_m % 3 padding rows
    assert kernels.prefill_tile(8) == (block_m, block_m // 8)
    assert kernels.prefill_tile(2 * block_m + 1) == (4 * block_m, 1)   # one token's heads exceed block_m rows
    for group in range(1, 2 * block_m):
        rows, tokens = kernels.prefill_tile(group)
        assert rows & (rows - 1) == 0 and tokens >= 1 and rows - group < tokens * group <= rows


# ---------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2)])
def test_decode_split_k_matches_reference(num_splits, num_heads, num_kv_heads):
    # Contexts of one token, one tile, several tiles; with 8 splits the short ones leave splits empty.
    seqs = [(0, 1), (30, 1), (300, 1), (129, 1)]
    batch = Batch(seqs, 16, num_heads, num_kv_heads, 64, torch.float32, seed=num_splits)
    kernels.store_kv(batch.key, batch.value, batch.key_cache, batch.value_cache, batch.slots)
    tables = [t + [0] * (max(map(len, batch.tables)) - len(t)) for t in batch.tables]
    out = torch.empty_like(batch.query)
    kernels.decode_attention(batch.query, batch.key_cache, batch.value_cache, out, int32(tables),
                             int32([c + 1 for c, _ in seqs]), num_splits, batch.scale)
    assert_close(out, batch.expected(), torch.float32)


def test_decode_zero_length_rows_give_zeros():
    """Rows of length 0 (padding in a CUDA-graph replay) produce zeros, never NaN, and leave the others alone."""
    batch = Batch([(40, 1)], 16, 4, 2, 64, torch.float32, seed=3)
    kernels.store_kv(batch.key, batch.value, batch.key_cache, batch.value_cache, batch.slots)
    query = torch.cat([batch.query, torch.randn_like(batch.query)])
    tables = int32([batch.tables[0], [0] * len(batch.tables[0])])
    out = torch.full_like(query, float("nan"))
    kernels.decode_attention(query, batch.key_cache, batch.value_cache, out, tables, int32([41, 0]), 4, batch.scale)
    assert_close(out[:1], batch.expected(), torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


# ---------------------------------------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", [
    (16, 4, 1, 64), (32, 4, 2, 128), (16, 12, 4, 64)])
def test_mixed_batch_matches_reference_and_torch_backend(dtype, block_size, num_heads, num_kv_heads, head_dim):
    rng = random.Random(block_size)
    # Decodes first (one with a long context), then prefill chunks with and without context.
    seqs = [(rng.randint(1, 40), 1), (333, 1), (rng.randint(1, 40), 1), (0, rng.randint(2, 23) | 1),
            (rng.randint(1, 30), rng.randint(2, 9))]
    batch = Batch(seqs, block_size, num_heads, num_kv_heads, head_dim, dtype, seed=7)
    torch_cache = (batch.key_cache.clone(), batch.value_cache.clone())
    backend = get_attention_backend(DEVICE, dtype, "triton")
    assert isinstance(backend, TritonAttentionBackend)
    layout = batch.layout(num_decodes=3)
    metadata = backend.build_metadata(layout, DEVICE)
    assert metadata.num_splits >= 1
    out = backend.forward(batch.query, batch.key, batch.value, batch.key_cache, batch.value_cache, metadata,
                          batch.spec)
    assert out.dtype == dtype
    expected = batch.expected()
    assert_close(out, expected, dtype)
    if dtype == torch.float32:
        reference = TorchAttentionBackend(dtype)
        torch_out = reference.forward(batch.query, batch.key, batch.value, *torch_cache,
                                      reference.build_metadata(layout, DEVICE), batch.spec)
        torch.testing.assert_close(out, torch_out, atol=2e-5, rtol=1e-4)
        assert torch.equal(batch.key_cache, torch_cache[0]) and torch.equal(batch.value_cache, torch_cache[1])


def test_forced_split_count_on_long_decodes():
    """A long decode spread over 16 splits (the metadata's count overridden) still matches."""
    seqs = [(700, 1), (5, 1), (0, 9)]
    batch = Batch(seqs, 16, 4, 2, 64, torch.float32, seed=11)
    backend = TritonAttentionBackend(torch.float32)
    metadata = backend.build_metadata(batch.layout(num_decodes=2), DEVICE)
    metadata.num_splits = 16
    out = backend.forward(batch.query, batch.key, batch.value, batch.key_cache, batch.value_cache, metadata,
                          batch.spec)
    assert_close(out, batch.expected(), torch.float32)


def test_graph_decode_metadata_replays_padded_batches():
    """Static decode buffers refilled for a smaller batch: the real rows match, padded rows store nothing."""
    seqs = [(50, 1), (3, 1), (17, 1)]
    batch = Batch(seqs, 16, 4, 2, 64, torch.float32, seed=5)
    backend = TritonAttentionBackend(torch.float32)
    static = backend.graph_decode_metadata(batch_size=8, max_blocks=6, max_seq_len=96, device=DEVICE)
    cache_before = batch.key_cache.clone()
    backend.fill_graph_decode_metadata(static, batch.layout(num_decodes=3))
    assert static.decode_seq_lens.tolist() == [51, 4, 18, 0, 0, 0, 0, 0]
    assert static.slot_mapping[3:].eq(-1).all()
    def padded(x):
        return torch.cat([x, torch.zeros(5, *x.shape[1:], dtype=x.dtype, device=x.device)])

    out = backend.forward(padded(batch.query), padded(batch.key), padded(batch.value), batch.key_cache,
                          batch.value_cache, static, batch.spec)
    assert_close(out[:3], batch.expected(), torch.float32)
    assert not out[3:].any()
    changed = (batch.key_cache != cache_before).any(-1).any(-1).view(-1)
    assert changed.sum() <= 3   # only the three real tokens' slots were written
    with pytest.raises(ValueError, match="exceeds the captured"):
        backend.fill_graph_decode_metadata(static, Batch([(200, 1)], 16, 4, 2, 64, torch.float32, 1).layout(1))
    with pytest.raises(ValueError, match="nothing else"):
        backend.fill_graph_decode_metadata(static, batch.layout(num_decodes=2))


# ---------------------------------------------------------------------------------------------- split choice
def test_choose_num_splits():
    # Big batches fill the GPU on their own: no split.
    assert kernels.choose_num_splits(256, 8, 8192, num_sms=132) == 1
    # Batch 1 with a long context: enough programs for the SMs, capped by the maximum.
    assert kernels.choose_num_splits(1, 8, 8192, num_sms=132) == 32
    assert kernels.choose_num_splits(1, 1, 1 << 20, num_sms=132) == kernels.MAX_DECODE_SPLITS
    # Short contexts are not split below MIN_TOKENS_PER_SPLIT tokens per program.
    assert kernels.choose_num_splits(1, 8, 300, num_sms=132) == 2
    assert kernels.choose_num_splits(1, 8, 100, num_sms=132) == 1
    for args in [(1, 8, 8192, 132), (3, 2, 5000, 108), (17, 4, 1000, 1)]:
        splits = kernels.choose_num_splits(*args)
        assert splits & (splits - 1) == 0 and 1 <= splits <= kernels.MAX_DECODE_SPLITS
    with pytest.raises(ValueError):
        kernels.choose_num_splits(0, 8, 10, 1)


# ---------------------------------------------------------------------------------------------- real GPU
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_large_mixed_batch(dtype):
    """Compiled kernels (not the interpreter) on realistic shapes: Llama-3-8B heads, long contexts."""
    rng = random.Random(0)
    seqs = [(rng.randint(1, 4000), 1) for _ in range(12)] + [(0, 500), (1000, 257), (3, 64)]
    batch = Batch(seqs, 16, 32, 8, 128, dtype, seed=0)
    backend = get_attention_backend(DEVICE, dtype)
    assert isinstance(backend, TritonAttentionBackend)
    metadata = backend.build_metadata(batch.layout(num_decodes=12), DEVICE)
    out = backend.forward(batch.query, batch.key, batch.value, batch.key_cache, batch.value_cache, metadata,
                          batch.spec)
    assert_close(out, batch.expected(), dtype)
