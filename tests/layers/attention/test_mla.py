"""Multi-head latent attention: absorbed attention over the cached latent equals attention with per-head keys and
values expanded from it (what transformers computes), on every CPU backend and the mixed batches of
:mod:`test_window_softcap` (decodes, chunks over cached context, fresh prompts); the layer caches one
``kv_lora_rank + rope`` entry per token, once; the Triton backend refuses it."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.attention.mla import LatentUpProjection, MLAAttention
from tests.layers.attention.test_window_softcap import (
    CPU,
    MIXED,
    MIXED_DECODES,
    Batch,
    assert_close,
    make_backend,
    reference_attention,
)
from tests.model_helpers import new_kv_cache

HEADS, LATENT, ROPE, NOPE, V = 4, 32, 8, 16, 24
SCALE = (NOPE + ROPE) ** -0.5
# (latent, rope): a small odd size (the CPU kernel's scalar path) and DeepSeek's 512 + 64 (its vector path).
LATENT_SIZES = [(32, 8), (512, 64)]


def up_projection(latent: int = LATENT, seed: int = 0) -> LatentUpProjection:
    up = LatentUpProjection(latent, HEADS, NOPE, V, tp_rank=0, tp_size=1)
    up.weight.data = torch.randn(up.weight.shape, generator=torch.Generator().manual_seed(seed)) * latent ** -0.5
    return up


def expanded_reference(batch: Batch, up: LatentUpProjection, q_nope: list[torch.Tensor], latent_size: int,
                       scale: float) -> torch.Tensor:
    """Per sequence: keys ``[W_UK_h c, k_pe]`` and values ``W_UV_h c`` for every head, queries ``[q_nope, q_pe]``,
    dense attention; [T, H * V]."""
    out = []
    for (ctx, _), q, k, nope in zip(batch.seqs, batch.queries, batch.full_k, q_nope):
        latent, k_pe = k[:, 0, :latent_size], k[:, :, latent_size:]
        keys = torch.cat((torch.einsum("sl,hnl->shn", latent, up.w_uk), k_pe.expand(-1, HEADS, -1)), dim=-1)
        values = torch.einsum("sl,hvl->shv", latent, up.w_uv)
        query = torch.cat((nope, q[..., latent_size:]), dim=-1)
        out.append(reference_attention(query, keys, values, ctx, scale).flatten(1))
    return torch.cat(out)


@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("latent,rope", LATENT_SIZES)
def test_absorbed_attention_over_the_latent_equals_expanded_heads(backend_name, block_size, latent, rope):
    # Unit-variance keys and queries of latent + rope dims: scaled by their size, the scores stay moderate.
    scale = (latent + rope) ** -0.5
    batch = Batch(MIXED, MIXED_DECODES, block_size, HEADS, 1, latent + rope, seed=block_size)
    gen = torch.Generator().manual_seed(1)
    q_nope = [torch.randn(n, HEADS, NOPE, generator=gen) for _, n in batch.seqs]
    up = up_projection(latent)
    backend = make_backend(backend_name)
    layer = MLAAttention(HEADS, latent, rope, scale)
    cache, _ = batch.caches(CPU)   # the contexts' latents; the value cache is the same tensor
    layer.bind_cache(backend, cache, cache)
    query = torch.cat((up.absorb_query(torch.cat(q_nope)), batch.query[..., latent:]), dim=-1)
    kv = batch.key[:, 0]
    metadata = backend.build_metadata(batch.layout(CPU), CPU)
    out = up.expand_output(layer(query, kv, metadata))
    assert_close(out, expanded_reference(batch, up, q_nope, latent, scale))
    # The step's latents went into their slots, once per token.
    torch.testing.assert_close(cache.view(-1, latent + rope)[batch.slots], kv)


def test_the_cache_holds_one_latent_and_rope_key_per_token():
    layer = MLAAttention(HEADS, LATENT, ROPE, SCALE)
    assert layer.values_in_key_cache and layer.num_kv_heads == 1 and layer.head_dim == LATENT + ROPE
    assert layer.kv_cache_elements_per_token() == LATENT + ROPE
    key_cache, value_cache = new_kv_cache(layer, 3, 16)
    assert value_cache is key_cache and key_cache.shape == (3, 16, 1, LATENT + ROPE)


def test_triton_backend_refuses_mla():
    backend = make_backend("triton")
    layer = MLAAttention(HEADS, LATENT, ROPE, SCALE)
    with pytest.raises(NotImplementedError, match="LLMSERVE_ATTENTION_BACKEND=torch"):
        layer.bind_cache(backend, *new_kv_cache(layer, 2, 16))
