"""Partial rotary against a plain per-token reference: only each head's first ``rotary_dim`` dims rotate (in
the neox or the interleaved layout over those dims), the rest pass through, in the PyTorch path and the
compiled CPU kernel alike."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers import rotary
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.rotary import RotaryEmbedding, rotary_inv_freq


def paths() -> list[str]:
    """The PyTorch path, and the compiled kernel where this machine builds it."""
    return ["pytorch"] + (["kernel"] if cpu_kernels() is not None else [])


def reference_rotate(x: torch.Tensor, position: int, inv_freq: torch.Tensor, rotary_dim: int, scale: float = 1.0,
                     interleaved: bool = False) -> torch.Tensor:
    """``x`` [heads, head_dim] at ``position``: each pair of the first ``rotary_dim`` dims (``i, i + R/2``, or
    ``2i, 2i + 1`` interleaved) turned by ``position * inv_freq[i]``, cos and sin times ``scale``."""
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        angle = torch.tensor(position, dtype=torch.float32) * inv_freq[i]
        cos, sin = angle.cos() * scale, angle.sin() * scale
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, half + i)
        out[:, a] = x[:, a] * cos - x[:, b] * sin
        out[:, b] = x[:, b] * cos + x[:, a] * sin
    return out


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (16, 12), (128, 96)])
def test_partial_rotary_matches_the_reference(monkeypatch, path, interleaved, head_dim, rotary_dim):
    if path == "pytorch":
        monkeypatch.setattr(rotary, "layer_ops_for", lambda x: None)
    rope = RotaryEmbedding(head_dim, 64, 10000.0, interleaved=interleaved, rotary_dim=rotary_dim)
    positions = torch.tensor([0, 5, 63, 17])
    qkv = torch.randn(4, (3 + 1 + 1) * head_dim)   # q and k as views into one fused projection's output
    q, k = qkv[:, :3 * head_dim].view(4, 3, head_dim), qkv[:, 3 * head_dim:4 * head_dim].view(4, 1, head_dim)
    inv_freq = rotary_inv_freq(rotary_dim, 10000.0)
    expected_q = torch.stack([reference_rotate(q[t], int(p), inv_freq, rotary_dim, interleaved=interleaved)
                              for t, p in enumerate(positions)])
    expected_k = torch.stack([reference_rotate(k[t], int(p), inv_freq, rotary_dim, interleaved=interleaved)
                              for t, p in enumerate(positions)])
    got_q, got_k = rope(positions, q, k)
    torch.testing.assert_close(got_q, expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, expected_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_q[..., rotary_dim:], qkv[:, :3 * head_dim].view(4, 3, head_dim)[..., rotary_dim:])


def test_rotary_dim_must_be_even_and_within_the_head():
    for rotary_dim in (0, 7, 18):
        with pytest.raises(ValueError, match="rotary_dim must be even"):
            RotaryEmbedding(16, 8, 10000.0, rotary_dim=rotary_dim)


@pytest.mark.parametrize("scaling", [
    # DeepSeek-V3's shape: mscale = mscale_all_dim (attention factor 1), the explicit factor.
    {"factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0,
     "beta_fast": 32, "beta_slow": 1},
    # No factor (max_position / original), the paper's attention factor, the correction range not truncated.
    {"factor": None, "original_max_position_embeddings": 256, "truncate": False},
    # mscale != mscale_all_dim, an explicit attention factor overriding them.
    {"factor": 8.0, "original_max_position_embeddings": 128, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"factor": 8.0, "original_max_position_embeddings": 128, "attention_factor": 0.9},
], ids=["deepseek-v3", "derived-factor", "mscales", "explicit-attention-factor"])
def test_yarn_tables_are_transformers(scaling):
    """YaRN's frequencies and attention factor (the cos/sin multiplier) equal transformers'
    ``_compute_yarn_parameters``, and the rotation uses both."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, **scaling}
    config = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16,
                              max_position_embeddings=2048, rope_parameters=rope)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours, factor = rotary.yarn_parameters(16, 10000.0, rope, 2048)
    torch.testing.assert_close(ours, inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(attention_factor)
    rope_layer = RotaryEmbedding(16, 2048, 10000.0, rope, interleaved=True)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 16)
    q_out, k_out = rope_layer(torch.tensor([300]), q.clone(), k.clone())
    torch.testing.assert_close(q_out[0], reference_rotate(q[0], 300, inv_freq, 16, attention_factor, True))
    torch.testing.assert_close(k_out[0], reference_rotate(k[0], 300, inv_freq, 16, attention_factor, True))
