"""Gemma 4's proportional rotary: the frequencies transformers computes (spaced over the whole head, zero past
the rotated quarter), so the dims past it pass through unchanged and the rotated ones turn as transformers'
``apply_rotary_pos_emb`` turns them."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.proportional_rotary import (
    ProportionalRotaryEmbedding,
    proportional_inv_freq,
)


@pytest.mark.parametrize("head_dim,factor,scale", [(24, 0.25, 1.0), (512, 0.25, 1.0), (64, 0.5, 8.0), (16, 1.0, 1.0)])
def test_frequencies_are_transformers(head_dim, factor, scale):
    from transformers import Gemma4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "proportional", "partial_rotary_factor": factor, "rope_theta": 1e6, "factor": scale}
    config = Gemma4TextConfig(num_hidden_layers=2, head_dim=head_dim, global_head_dim=head_dim,
                              rope_parameters={"full_attention": params,
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    expected, _ = ROPE_INIT_FUNCTIONS["proportional"](config, layer_type="full_attention")
    torch.testing.assert_close(proportional_inv_freq(head_dim, 1e6, factor, scale), expected)


def test_only_the_rotated_pairs_turn():
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    rope = ProportionalRotaryEmbedding(24, 64, 1e6, 0.25)   # 3 of 12 pairs: dims 0-2 with 12-14
    q, k = torch.randn(5, 6, 24), torch.randn(5, 1, 24)
    positions = torch.tensor([0, 1, 7, 30, 63])
    rq, rk = rope(positions, q.clone(), k.clone())
    freqs = positions[:, None].float() * proportional_inv_freq(24, 1e6, 0.25)
    emb = torch.cat((freqs, freqs), dim=-1)
    torch.testing.assert_close(rq, apply_rotary_pos_emb(q, emb.cos(), emb.sin(), unsqueeze_dim=1))
    torch.testing.assert_close(rk, apply_rotary_pos_emb(k, emb.cos(), emb.sin(), unsqueeze_dim=1))
    still = [d for d in range(24) if d % 12 >= 3]
    assert torch.equal(rq[..., still], q[..., still]) and not torch.allclose(rq[1:, :, :3], q[1:, :, :3])
