"""A layer sharing another layer's K/V (Gemma 4) in every backend (PyTorch, the CPU kernel, Triton under the
interpreter): it attends its own queries over the source layer's cache, with its own query-head count and
scale and the source's window, equal to a dense reference over the source's K/V, on the mixed batches of
:mod:`test_window_softcap`; and it leaves the source's cache as the source wrote it."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.attention.layer import Attention
from llmserve.layers.attention.shared_kv import SharedKVAttention
from tests.layers.attention.test_window_softcap import (
    CPU,
    DEVICE,
    MIXED,
    MIXED_DECODES,
    Batch,
    assert_close,
    make_backend,
    reference_attention,
)


@pytest.mark.parametrize("backend_name", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [None, 7])
def test_shared_layer_attends_over_the_source_layers_cache(backend_name, block_size, window):
    batch = Batch(MIXED, MIXED_DECODES, block_size, 2, 2, 64, seed=block_size)
    device = DEVICE if backend_name == "triton" else CPU
    backend = make_backend(backend_name)
    source = Attention(2, 2, 64, 64 ** -0.5, sliding_window=window)
    source.bind_cache(backend, *batch.caches(device))
    shared = SharedKVAttention(source, 6, 0.1)   # 6 query heads over the source's 2 KV heads (GQA 3)
    assert shared.spec.sliding_window == window and shared.key_cache.numel() == 0
    metadata = backend.build_metadata(batch.layout(device), device)
    t = batch.query.shape[0]
    key, value = batch.key.reshape(t, -1).to(device), batch.value.reshape(t, -1).to(device)
    source(batch.query.reshape(t, -1).to(device), key, value, metadata)
    written = source.key_cache.clone(), source.value_cache.clone()

    queries = torch.randn(t, 6, 64, generator=torch.Generator().manual_seed(7))
    out = shared(queries.reshape(t, -1).to(device), key, value, metadata).view(t, 6, 64)

    starts = torch.tensor([0] + [n for _, n in batch.seqs]).cumsum(0).tolist()
    expected = torch.cat([reference_attention(queries[s:e], k, v, ctx, 0.1, window)
                          for (ctx, _), s, e, k, v in zip(batch.seqs, starts, starts[1:], batch.full_k, batch.full_v)])
    assert_close(out, expected)
    assert torch.equal(source.key_cache, written[0]) and torch.equal(source.value_cache, written[1])
