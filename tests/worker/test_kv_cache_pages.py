"""A cache tensor shared by layers of different shapes is a byte buffer with one page per block as large as its
largest member's (rounded up to the widest element), which each member views with its own shape and dtype,
contiguous within a block and a page apart. Every backend (PyTorch, the compiled CPU decode kernel, Triton under
the interpreter without a GPU) writes and reads such a view exactly as it does a layer's own contiguous cache,
in every cache dtype, and never touches the bytes past the member's page."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.attention.backend import AttentionSpec
from llmserve.layers.attention.layer import Attention
from llmserve.layers.attention.mla import MLAAttention
from llmserve.quantization.kv_cache import kv_cache_format, quantize_kv
from llmserve.worker.kv_cache_pages import SharedPage, layer_view, page_bytes
from tests.layers.attention.paged_batch import PagedBatch
from tests.layers.attention.test_quantized_kv_cache import backends

BS = 4


def test_a_page_is_the_largest_members_rounded_up_to_the_widest_element():
    sliding, full = Attention(6, 2, 16, 1.0), Attention(6, 1, 24, 1.0)   # Gemma 4's tiny layers
    assert page_bytes(sliding, BS, torch.float32) == BS * 2 * 16 * 4
    page = SharedPage.of([full, sliding], BS, torch.float32)
    assert (page.page, page.block_bytes) == (BS * 2 * 16 * 4, 2 * BS * 2 * 16 * 4)
    # 9 int8 entries a block: a page of 9 bytes alone, 12 beside a float32 layer (whose view needs 4-byte steps).
    odd = Attention(9, 9, 1, 1.0, kv_cache_dtype="int8")
    assert SharedPage.of([odd], 1, torch.float32).page == 9
    assert SharedPage.of([odd, Attention(1, 1, 2, 1.0)], 1, torch.float32).page == 12
    # Latent attention keeps no value buffer; were every cache in the model's dtype, int8's page is float32's.
    latent = MLAAttention(4, 24, 8, 1.0)
    assert SharedPage.of([latent], BS, torch.float32).block_bytes == BS * 32 * 4
    assert SharedPage.of([odd], 1, torch.float32, in_model_dtype=True).page == 36


def test_each_member_views_its_blocks_a_page_apart_in_its_own_dtype():
    small, large = Attention(4, 1, 8, 1.0, kv_cache_dtype="int8"), Attention(4, 2, 8, 1.0)
    page = SharedPage.of([small, large], BS, torch.float32)
    key, value = page.allocate(5, torch.device("cpu"))
    view = layer_view(key, small, BS, torch.float32)
    assert view.dtype == torch.int8 and view.shape == (5, BS, 1, 8) and view.stride() == (page.page, 8, 8, 1)
    assert view.data_ptr() == key.data_ptr() == layer_view(key, large, BS, torch.float32).data_ptr()
    assert layer_view(key, large, BS, torch.float32).is_contiguous()   # the largest member: a plain cache
    view[3] = 7
    assert key[3, :BS * 8].eq(7).all() and key[3, BS * 8:].eq(0).all() and key[[0, 1, 2, 4]].eq(0).all()
    assert value.eq(0).all()


SEQS = [(37, 1), (5, 1), (30, 1), (20, 9), (0, 13)]   # decodes, a chunk over cached context, a fresh prompt
NUM_DECODES = 3
SCALES = {"int8": (5.0 / 127, 4.5 / 127), "fp8_e4m3": (1.0, 0.5)}


@pytest.mark.parametrize("cache", ["auto", "bfloat16", "int8", "fp8_e4m3"])
def test_every_backend_serves_a_padded_view_as_it_serves_a_contiguous_cache(cache):
    """A layer of 2 KV heads of 16 shares its tensor with one of 3 KV heads of 32 (its page 3x larger): the step
    writes the same entries and attends the same output through the padded view as through a cache of its own,
    and the rest of each page stays as it was."""
    dtype = torch.bfloat16 if cache == "bfloat16" else torch.float32
    kv_dtype = "auto" if cache == "bfloat16" else cache
    batch = PagedBatch(SEQS, BS, 4, 2, 16, dtype=dtype, seed=1)
    layer = Attention(4, 2, 16, 0.25, kv_cache_dtype=kv_dtype)
    other = Attention(6, 3, 32, 0.25, kv_cache_dtype=kv_dtype)
    spec = AttentionSpec(4, 2, 16, 0.25, sliding_window=24, kv_cache_dtype=kv_dtype)
    fmt = kv_cache_format(cache)
    own = [batch.key_cache, batch.value_cache]
    scales = None
    if fmt is not None:
        scales = torch.tensor(SCALES[cache])
        own = [quantize_kv(c, scale, fmt) for c, scale in zip(own, scales)]
    page = SharedPage.of([layer, other], BS, dtype)
    num_blocks = batch.key_cache.shape[0]
    for backend in backends(dtype=dtype):
        buffers = page.allocate(num_blocks, torch.device("cpu"))
        for buffer in buffers:
            buffer.fill_(0xA5)   # padding past the layer's page must keep this
        views = [layer_view(b, layer, BS, dtype) for b in buffers]
        for view, own_cache in zip(views, own):
            view.copy_(own_cache)
        contiguous = [c.clone() for c in own]
        metadata = backend.build_metadata(batch.batch_layout(NUM_DECODES), torch.device("cpu"))
        expected = backend.forward(batch.query, batch.key, batch.value, *contiguous, metadata, spec, scales)
        metadata = backend.build_metadata(batch.batch_layout(NUM_DECODES), torch.device("cpu"))
        out = backend.forward(batch.query, batch.key, batch.value, *views, metadata, spec, scales)
        assert torch.equal(out, expected), backend.name
        for view, cache_after, buffer in zip(views, contiguous, buffers):
            assert torch.equal(view.view(torch.uint8), cache_after.view(torch.uint8)), backend.name
            assert buffer[:, page_bytes(layer, BS, dtype):].eq(0xA5).all(), backend.name
