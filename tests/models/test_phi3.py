"""Phi-3: the fused ``qkv_proj`` / ``gate_up_proj`` checkpoint tensors load whole or sharded, the sliding window,
LongRoPE (short factors up to ``original_max_position_embeddings``, long ones past it, the attention factor) and
partial rotary (Phi-4-mini) are computed as transformers computes them, and each one changes the output (so the
engine-level HF-equivalence tests would catch an engine that got it wrong or ignored it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmserve.models.llama import UnsupportedModelConfigError
from llmserve.testing.checkpoint_families import PHI3_LONG_FACTOR, PHI3_SHORT_FACTOR
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, hf_logits, with_config

SWITCH = 32   # the tiny LongRoPE checkpoints' original_max_position_embeddings
BELOW, ABOVE = LONG_PROMPT[:20], LONG_PROMPT + LONG_PROMPT[:10]   # 20 and 40 tokens


def rope_variant(tmp_path: Path, base: Path, name: str, scaling: dict | None, **changes) -> Path:
    """``base`` with its rope scaling replaced by ``scaling`` (None: plain rope), in both config styles."""
    path = Path(shutil.copytree(base, tmp_path / name))
    config = json.loads((path / "config.json").read_text())
    config.update(changes, rope_scaling=scaling,
                  rope_parameters={**(scaling or {"rope_type": "default"}), "rope_theta": 10000.0,
                                   "partial_rotary_factor": changes.get("partial_rotary_factor",
                                                                        config.get("partial_rotary_factor", 1.0))})
    (path / "config.json").write_text(json.dumps(config))
    return path


def longrope(short=PHI3_SHORT_FACTOR, long=PHI3_LONG_FACTOR, **extra) -> dict:
    return {"rope_type": "longrope", "short_factor": list(short), "long_factor": list(long), **extra}


@pytest.mark.parametrize("changes", [{}, {"sliding_window": 4096}], ids=["as-written", "window-wider-than-prompt"])
def test_logits_match_hf_and_the_window_changes_them(checkpoint_dir, tmp_path, changes):
    base = checkpoint_dir("phi3")
    assert_matches_hf(with_config(tmp_path, base, changes) if changes else base, base if changes else None)


@pytest.mark.parametrize("family", ["phi3_longrope", "phi4_mini"])
@pytest.mark.parametrize("ids", [BELOW, ABOVE], ids=["below-switch", "above-switch"])
def test_longrope_logits_match_hf_below_and_above_the_switch(checkpoint_dir, family, ids):
    path = checkpoint_dir(family)
    expected = hf_logits(str(path), tuple(ids))
    torch.testing.assert_close(prefill_logits(load_tiny(path), ids), expected, atol=1e-4, rtol=1e-4)


def differs(a: Path, b: Path, ids: list[int]) -> bool:
    return bool((hf_logits(str(a), tuple(ids)) - hf_logits(str(b), tuple(ids))).abs().max() > 1e-2)


def test_each_longrope_feature_changes_the_output(checkpoint_dir, tmp_path):
    """Plain rope differs on both sides of the switch; the long factors only past it (so the switch is where
    transformers puts it); the attention factor everywhere."""
    base = checkpoint_dir("phi3_longrope")
    plain = rope_variant(tmp_path, base, "plain", None)
    short_only = rope_variant(tmp_path, base, "short-only", longrope(long=PHI3_SHORT_FACTOR))
    unscaled = rope_variant(tmp_path, base, "unscaled", longrope(attention_factor=1.0))
    assert differs(base, plain, BELOW) and differs(base, plain, ABOVE)
    assert not differs(base, short_only, BELOW) and differs(base, short_only, ABOVE)
    assert differs(base, unscaled, BELOW) and differs(base, unscaled, ABOVE)
    for variant in (short_only, unscaled):
        torch.testing.assert_close(prefill_logits(load_tiny(variant), ABOVE),
                                   hf_logits(str(variant), tuple(ABOVE)), atol=1e-4, rtol=1e-4)


def test_partial_rotary_changes_the_output(checkpoint_dir, tmp_path):
    base = checkpoint_dir("phi4_mini")
    full = rope_variant(tmp_path, base, "full-rotary", longrope(), partial_rotary_factor=1.0)
    assert differs(base, full, BELOW)
    torch.testing.assert_close(prefill_logits(load_tiny(full), BELOW), hf_logits(str(full), tuple(BELOW)),
                               atol=1e-4, rtol=1e-4)


def test_older_configs_longrope_name_su_loads_as_longrope(checkpoint_dir, tmp_path):
    """transformers renames ``su`` after it standardises the rope dict, so these configs carry the switch in it."""
    su = rope_variant(tmp_path, checkpoint_dir("phi3_longrope"), "su",
                      longrope(rope_type="su", original_max_position_embeddings=SWITCH))
    torch.testing.assert_close(prefill_logits(load_tiny(su), ABOVE),
                               hf_logits(str(checkpoint_dir("phi3_longrope")), tuple(ABOVE)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["phi3", "phi4_mini"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, family):
    """The fused tensors split into q/k/v and gate/up before each of 2 ranks takes its 3 heads / 1 KV head."""
    path = checkpoint_dir(family)
    expected = prefill_logits(load_tiny(path), ABOVE)
    for logits in tensor_parallel_logits(path, 2, ABOVE):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_rotary_fraction_that_is_not_a_share_is_refused(checkpoint_dir, tmp_path):
    with pytest.raises(UnsupportedModelConfigError, match="partial_rotary_factor must be in"):
        load_tiny(rope_variant(tmp_path, checkpoint_dir("phi3"), "bad", None, partial_rotary_factor=1.5))
