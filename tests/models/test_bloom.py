"""BLOOM: computed as transformers computes it (ALiBi for head counts that are and are not powers of two, the
embedding LayerNorm, the per-head fused query_key_value, the post-norm residual option), each feature changing
the output (so the engine-level HF-equivalence tests would catch an engine that got it wrong or ignored it);
released checkpoints' names load; tensor-parallel ranks take their heads' slopes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.layers.attention.alibi import alibi_slopes
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, with_config

VARIANTS = {
    "as-written": {},   # 6 heads of 16
    "8-heads": {"n_head": 8},     # a power of two: one geometric sequence of slopes
    "12-heads": {"n_head": 12},   # 8 + 4 heads: the second sequence's odd powers, of base 2 ** -0.5
    "residual-after-norm": {"apply_residual_connection_post_layernorm": True},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf_and_each_feature_changes_them(checkpoint_dir, tmp_path, name):
    changes = VARIANTS[name]
    base = checkpoint_dir("bloom")
    assert_matches_hf(with_config(tmp_path, base, changes) if changes else base, base if changes else None)


def test_every_layer_attends_with_alibi_and_no_positions(checkpoint_dir):
    model = load_tiny(checkpoint_dir("bloom"))
    for layer in model.model.layers:
        assert layer.self_attn.rotary_emb is None
        assert layer.self_attn.attn.spec.alibi_slopes == pytest.approx(alibi_slopes(6))


def test_released_checkpoint_names_load_the_same(checkpoint_dir, tmp_path):
    """The released BLOOM files are saved from ``BloomModel``: no ``transformer.`` prefix, no ``lm_head``."""
    base = checkpoint_dir("bloom")
    path = shutil.copytree(base, tmp_path / "released")
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(str(base / "model.safetensors")).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for (name, a), (_, b) in zip(load_tiny(base).named_parameters(), load_tiny(path).named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir):
    """6 heads over 2 ranks: each rank restacks its 3 heads of the per-head fused q/k/v and biases them by
    their own slopes."""
    path = checkpoint_dir("bloom")
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
