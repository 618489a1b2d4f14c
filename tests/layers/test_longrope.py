"""LongRoPE against a plain per-token reference: the short factors up to the switch, the long ones past it,
cos and sin scaled by the attention factor, chosen per token from its rotary length, so one batch mixes
sequences on either side of the switch; in the PyTorch path and the compiled CPU kernel alike."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llmserve.layers import rotary
from llmserve.layers.longrope import (LongRoPERotaryEmbedding, longrope_attention_factor, longrope_prompt_key,
                                      longrope_switch_of, rotary_embedding)
from llmserve.layers.rotary import RotaryEmbedding
from tests.layers.test_rotary import paths, reference_rotate

SWITCH, MAX_POSITION, BASE = 32, 2048, 10000.0
SHORT = [1.0, 1.1, 1.3, 1.6]
LONG = [1.0, 2.0, 4.5, 9.0]


def config(**changes) -> SimpleNamespace:
    return SimpleNamespace(**{"max_position_embeddings": MAX_POSITION, "original_max_position_embeddings": SWITCH,
                              **changes})


def scaling(**changes) -> dict:
    return {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, **changes}


def longrope_inv_freq(factors: list[float], rotary_dim: int) -> torch.Tensor:
    return 1.0 / (torch.tensor(factors) * BASE ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))


def test_attention_factor_follows_transformers():
    assert longrope_attention_factor(config(), scaling()) == pytest.approx(
        math.sqrt(1 + math.log(MAX_POSITION / SWITCH) / math.log(SWITCH)))
    assert longrope_attention_factor(config(), scaling(attention_factor=1.25)) == 1.25
    assert longrope_attention_factor(config(), scaling(factor=4.0)) == pytest.approx(
        math.sqrt(1 + math.log(4.0) / math.log(SWITCH)))
    assert longrope_attention_factor(config(max_position_embeddings=SWITCH), scaling()) == 1.0   # factor 1


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("head_dim,rotary_dim", [(8, 8), (12, 8)], ids=["full", "partial"])
def test_a_batch_mixing_short_and_long_sequences(monkeypatch, path, head_dim, rotary_dim):
    """Four sequences in one step: a decode at position 20 (short), a 4-token chunk of a 40-token prompt (long
    from position 0), a decode at position 32 of a sequence whose 20-token prompt was short (long from
    position 32 on: its rotary length is 33), and one at the last position. The short rows stop at the switch."""
    if path == "pytorch":
        monkeypatch.setattr(rotary, "layer_ops_for", lambda x: None)
    rope = LongRoPERotaryEmbedding(config(), head_dim, rotary_dim, BASE, scaling())
    assert rope.cos_cache.shape == (SWITCH + MAX_POSITION, rotary_dim // 2)
    positions = torch.tensor([20, 0, 1, 2, 3, 32, MAX_POSITION - 1])
    lengths = torch.tensor([21, 40, 40, 40, 40, 33, MAX_POSITION])
    q, k = torch.randn(7, 3, head_dim), torch.randn(7, 1, head_dim)
    expected_q, expected_k = q.clone(), k.clone()
    scale = longrope_attention_factor(config(), scaling())
    for t, is_long in enumerate([False, True, True, True, True, True, True]):
        inv_freq = longrope_inv_freq(LONG if is_long else SHORT, rotary_dim)
        expected_q[t] = reference_rotate(q[t], int(positions[t]), inv_freq, rotary_dim, scale)
        expected_k[t] = reference_rotate(k[t], int(positions[t]), inv_freq, rotary_dim, scale)
    got_q, got_k = rope(positions, q, k, lengths)
    torch.testing.assert_close(got_q, expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, expected_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,factors", [(SWITCH, SHORT), (SWITCH + 1, LONG)], ids=["at-switch", "past-it"])
def test_without_lengths_the_tokens_are_one_pass(length, factors):
    """As transformers decides for one forward: ``max(positions) + 1`` over the switch rotates every token long."""
    rope = LongRoPERotaryEmbedding(config(), 8, 8, BASE, scaling())
    positions = torch.arange(length)
    q, k = torch.randn(length, 2, 8), torch.randn(length, 1, 8)
    expected = torch.stack([reference_rotate(q[t], t, longrope_inv_freq(factors, 8), 8,
                                             longrope_attention_factor(config(), scaling()))
                            for t in range(length)])
    torch.testing.assert_close(rope(positions, q.clone(), k.clone())[0], expected, atol=1e-5, rtol=1e-5)


def test_factor_lists_must_cover_the_rotary_dims():
    with pytest.raises(ValueError, match="short_factor must have 3 values"):
        LongRoPERotaryEmbedding(config(), 8, 6, BASE, scaling())


def test_a_layer_gets_longrope_from_its_rope_type():
    longrope_config = config(rope_parameters=scaling(rope_theta=BASE))
    assert isinstance(rotary_embedding(longrope_config, 8, 8), LongRoPERotaryEmbedding)
    plain = rotary_embedding(config(rope_parameters={"rope_type": "default", "rope_theta": BASE}), 8, 6)
    assert type(plain) is RotaryEmbedding and plain.rotary_dim == 6
    with pytest.raises(ValueError, match="neox"):
        rotary_embedding(longrope_config, 8, 8, interleaved=True)


def test_the_switch_and_the_prefix_cache_key():
    phi3 = config(rope_parameters=scaling(rope_theta=BASE))
    assert longrope_switch_of(phi3) == SWITCH
    per_layer_type = config(rope_parameters={"full_attention": scaling(),
                                             "sliding_attention": {"rope_type": "default"}})
    assert longrope_switch_of(per_layer_type) == SWITCH
    assert longrope_switch_of(config(rope_parameters={"rope_type": "default", "rope_theta": BASE})) is None
    assert longrope_prompt_key(SWITCH, SWITCH) is None
    assert longrope_prompt_key(SWITCH, SWITCH + 1) == "longrope:long"
    assert longrope_prompt_key(None, 10_000) is None
