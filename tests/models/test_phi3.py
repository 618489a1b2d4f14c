"""Phi-3: the fused ``qkv_proj`` / ``gate_up_proj`` checkpoint tensors load whole or sharded, the sliding window is
computed as transformers computes it, and LongRoPE and partial rotary are refused with a message that says why."""

from __future__ import annotations

import pytest
import torch

from llmserve.models.llama import UnsupportedModelConfigError
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.test_gemma import LONG_PROMPT, hf_logits, with_config


@pytest.mark.parametrize("changes", [{}, {"sliding_window": 4096}], ids=["as-written", "window-wider-than-prompt"])
def test_logits_match_hf_and_the_window_changes_them(checkpoint_dir, tmp_path, changes):
    base = checkpoint_dir("phi3")
    path = with_config(tmp_path, base, changes) if changes else base
    expected = hf_logits(str(path))
    torch.testing.assert_close(prefill_logits(load_tiny(path), LONG_PROMPT), expected, atol=1e-4, rtol=1e-4)
    if changes:
        assert (expected - hf_logits(str(base))).abs().max() > 1e-2, "the window does not change the output"


def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir):
    """The fused tensors split into q/k/v and gate/up before each of 2 ranks takes its 3 heads / 1 KV head."""
    path = checkpoint_dir("phi3")
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def longrope(kind: str) -> dict:
    scaling = {"type": kind, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
               "original_max_position_embeddings": 512}
    return {"rope_scaling": scaling, "rope_parameters": {**scaling, "rope_type": kind, "rope_theta": 10000.0},
            "original_max_position_embeddings": 512}


@pytest.mark.parametrize("changes,message", [
    (longrope("longrope"), "LongRoPE .* per sequence"),
    (longrope("su"), "LongRoPE"),    # the name older configs use
    ({"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5}}, "partial rotary"),
], ids=["longrope", "su", "partial-rotary"])
def test_unsupported_options_are_refused(checkpoint_dir, tmp_path, changes, message):
    with pytest.raises(UnsupportedModelConfigError, match=message):
        load_tiny(with_config(tmp_path, checkpoint_dir("phi3"), changes))
