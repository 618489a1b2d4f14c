"""ALiBi in every backend (PyTorch, the CPU kernel, Triton under the interpreter) against a dense reference
written here: each query head adds ``slope * (key_position - query_position)`` to its scaled scores, on the
mixed batches of :mod:`test_window_softcap` (decodes, chunks over a cached context, fresh prompts, paged KV on
shuffled blocks), alone and combined with a sliding window and a logit soft-cap; and the slopes are the ones
transformers' BLOOM and Falcon compute, for power-of-two head counts and others."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.attention.alibi import alibi_slopes
from llmserve.layers.attention.backend import AttentionSpec
from tests.layers.attention.test_window_softcap import (CPU, DEVICE, MIXED, MIXED_DECODES, Batch, assert_close,
                                                         assert_graph_decode_matches, graph_decode_batch,
                                                         run_cpu_decode_kernel, run_triton_split_decode,
                                                         make_backend, reference_mask, run)


def reference_alibi_attention(q, k, v, context_len, spec: AttentionSpec):
    """Dense float64 attention of q [Q, H, D] (positions context_len..) over k/v [S, KV, D]: scaled scores,
    soft-capped, plus each head's slope times (key position - query position), masked."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k) * spec.scale
    if spec.logits_soft_cap is not None:
        scores = spec.logits_soft_cap * torch.tanh(scores / spec.logits_soft_cap)
    if spec.alibi_slopes is not None:
        q_pos = torch.arange(context_len, context_len + q.shape[0], dtype=torch.float64)
        k_pos = torch.arange(k.shape[0], dtype=torch.float64)
        slopes = torch.tensor(spec.alibi_slopes, dtype=torch.float64)
        scores = scores + slopes[:, None, None] * (k_pos[None, None, :] - q_pos[None, :, None])
    keep = reference_mask(context_len, q.shape[0], spec.sliding_window)
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


def alibi_spec(batch: Batch, window=None, soft_cap=None, slopes=None) -> AttentionSpec:
    num_heads, num_kv_heads, head_dim = batch.shape
    return AttentionSpec(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, sliding_window=window,
                         logits_soft_cap=soft_cap, alibi_slopes=slopes or tuple(alibi_slopes(num_heads)))


def expected(batch: Batch, spec: AttentionSpec) -> torch.Tensor:
    return torch.cat([reference_alibi_attention(q, k, v, ctx, spec)
                      for (ctx, _), q, k, v in zip(batch.seqs, batch.queries, batch.full_k, batch.full_v)])


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 71, 112])
def test_slopes_are_transformers_bloom_and_falcon_slopes(num_heads):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    falcon = pytest.importorskip("transformers.models.falcon.modeling_falcon")
    mask = torch.ones(1, 3, dtype=torch.long)
    # Both add slope * key_position: key 1's bias is the slope (Falcon's in bfloat16).
    hf = bloom.build_alibi_tensor(mask, num_heads, torch.float32)[:, 0, 1]
    ours = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
    falcon_slopes = falcon.build_alibi_tensor(mask, num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(ours.bfloat16().float(), falcon_slopes, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_heads", [2, 6])   # over 2 KV heads: GQA 1 and 3 (6 heads: not a power of two)
@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, None), (None, 2.5), (40, 2.5)])
def test_mixed_rows_match_dense_reference(backend_name, block_size, num_heads, window, soft_cap):
    batch = Batch(MIXED, MIXED_DECODES, block_size, num_heads, 2, 64, seed=block_size + num_heads, query_scale=2.0)
    spec = alibi_spec(batch, window, soft_cap)
    out, _ = run(backend_name, batch, spec)
    assert_close(out, expected(batch, spec))


@pytest.mark.parametrize("backend_name", ["torch", "cpu", "triton"])
def test_a_ranks_slice_of_slopes_and_layers_without_alibi_share_the_step(backend_name):
    """A tensor-parallel rank's heads take their slice of the model's slopes (heads 4..7 of 8 here); layers
    with and without ALiBi, with and without a window, run over one step's metadata."""
    batch = Batch(MIXED, MIXED_DECODES, 4, 4, 2, 64, seed=11, query_scale=2.0)
    device = DEVICE if backend_name == "triton" else CPU
    backend = make_backend(backend_name)
    key_cache, value_cache = batch.caches(device)
    metadata = backend.build_metadata(batch.layout(device), device)
    second_rank = tuple(alibi_slopes(8)[4:])
    specs = [alibi_spec(batch, slopes=second_rank), batch.spec(), alibi_spec(batch, 9), batch.spec(9, 2.0),
             alibi_spec(batch)]
    for spec in specs:
        out = backend.forward(batch.query.to(device), batch.key.to(device), batch.value.to(device), key_cache,
                              value_cache, metadata, spec)
        assert_close(out, expected(batch, spec))


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("head_dim", [20, 128])   # the C kernel's scalar path, and its other vector case
def test_other_head_sizes(backend_name, head_dim):
    batch = Batch(MIXED, MIXED_DECODES, 16, 6, 2, head_dim, seed=head_dim, query_scale=2.0)
    for spec in (alibi_spec(batch), alibi_spec(batch, 9, 3.0)):
        assert_close(run(backend_name, batch, spec)[0], expected(batch, spec))


@pytest.mark.parametrize("backend_name,dtype", [("torch", torch.bfloat16), ("cpu", torch.bfloat16),
                                                ("triton", torch.bfloat16)])
def test_half_precision(backend_name, dtype):
    batch = Batch(MIXED, MIXED_DECODES, 16, 4, 2, 64, dtype=dtype, seed=3, query_scale=2.0)
    for spec in (alibi_spec(batch), alibi_spec(batch, 11, 2.0)):
        out, _ = run(backend_name, batch, spec, dtype)
        assert out.dtype == dtype
        assert_close(out, expected(batch, spec), dtype)


def test_torch_backend_slices_alibi_scores(monkeypatch):
    """ALiBi scores are materialised a slice of query rows at a time, each slice with its own distances."""
    from llmserve.layers.attention import explicit_attention

    monkeypatch.setattr(explicit_attention, "MAX_SCORE_ELEMENTS", 2000)
    batch = Batch(MIXED, MIXED_DECODES, 4, 6, 2, 64, seed=2, query_scale=2.0)
    for spec in (alibi_spec(batch), alibi_spec(batch, 7)):
        assert_close(run("torch", batch, spec)[0], expected(batch, spec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [20, 64])
@pytest.mark.parametrize("window", [None, 5])
def test_cpu_decode_kernel(head_dim, window, dtype):
    """The compiled kernel directly: many rows (whole sequences per work item) and one (a KV head per item)."""
    kernels, batch, key_cache, value_cache, tables, lens, spec, out = run_cpu_decode_kernel(
        head_dim, lambda batch: alibi_spec(batch, window), expected, dtype, sliding_window=window,
        alibi_slopes=lambda spec: torch.tensor(spec.alibi_slopes))
    with pytest.raises(ValueError, match="alibi_slopes must be a contiguous float32"):
        kernels.paged_decode_attention(batch.query, key_cache, value_cache, tables, lens, spec.scale, out,
                                       alibi_slopes=torch.ones(5))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_triton_decode_splits(num_splits):
    """Split-K decode: every split biases its own keys by their distance to the sequence's last token."""
    pytest.importorskip("triton", reason="triton is not installed")
    run_triton_split_decode(num_splits, lambda batch: alibi_spec(batch, 50), expected, window=50,
                            alibi_slopes=lambda spec: torch.tensor(spec.alibi_slopes, device=DEVICE))


def test_spec_takes_one_finite_slope_per_query_head():
    spec = AttentionSpec(4, 2, 16, 0.25, alibi_slopes=[0.5, 0.25, 0.125, 0.0625])
    assert spec.alibi_slopes == (0.5, 0.25, 0.125, 0.0625) and hash(spec)
    for slopes in ((0.5, 0.25), (0.5, 0.25, 0.1, float("nan"))):
        with pytest.raises(ValueError, match="alibi_slopes must be 4 finite numbers"):
            AttentionSpec(4, 2, 16, 0.25, alibi_slopes=slopes)


def test_triton_graph_decode_metadata():
    """A CUDA-graph decode batch (static buffers, padded rows of length 0): the query position comes from the
    lengths inside the kernel, so ALiBi layers replay from the same metadata."""
    pytest.importorskip("triton", reason="triton is not installed")
    batch = graph_decode_batch()
    assert_graph_decode_matches(batch, [alibi_spec(batch), alibi_spec(batch, 8, 2.0)],
                                lambda spec: expected(batch, spec))
