"""Command-R and Cohere2: every feature is computed as transformers computes it, and each one changes the output
(so the engine-level HF-equivalence tests would catch an engine that got it wrong or ignored it); the per-head
q/k norms shard over tensor-parallel ranks with their heads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, with_config

VARIANTS = {
    "cohere-as-written": ("cohere", {}),
    "cohere-other-logit-scale": ("cohere", {"logit_scale": 0.125}),
    "cohere-other-rope-base": ("cohere", {"rope_theta": 100.0, "rope_parameters": {"rope_type": "default",
                                                                                   "rope_theta": 100.0}}),
    "cohere-no-qk-norm": ("cohere", {"use_qk_norm": False}),   # and its tensors dropped
    "cohere2-as-written": ("cohere2", {}),
    "cohere2-window-wider-than-prompt": ("cohere2", {"sliding_window": 4096}),
    "cohere2-all-layers-slide-with-rope": ("cohere2", {"layer_types": ["sliding_attention"] * 4}),
    "cohere2-no-layer-slides-no-rope": ("cohere2", {"layer_types": ["full_attention"] * 4}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf_and_each_feature_changes_them(checkpoint_dir, tmp_path, name):
    family, changes = VARIANTS[name]
    base = checkpoint_dir(family)
    path = with_config(tmp_path, base, changes) if changes else base
    if changes.get("use_qk_norm") is False:
        tensors = load_file(str(path / "model.safetensors"))
        save_file({n: t for n, t in tensors.items() if "_norm" not in n or "layernorm" in n},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
    assert_matches_hf(path, base if changes else None)


@pytest.mark.parametrize("family", ["cohere", "cohere2"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, family):
    """6 query heads and 2 KV heads over 2 ranks: each rank's q/k norms hold its own heads' weights."""
    path = checkpoint_dir(family)
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
