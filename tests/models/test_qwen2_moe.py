"""Qwen2-MoE: logits equal transformers' on the generated checkpoint (7 experts, top-1, a gated shared expert,
the middle of 3 layers dense) and with renormalised top-2, top-4 and a differently scaled shared-expert gate
(each changes the output); transformers 5's stacked expert tensors load like the per-expert ones; simulated tensor-parallel ranks (experts, shared expert and dense MLP sharded, or
whole experts distributed with expert parallelism) compose to the single-rank model."""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, hf_logits, with_config
from tests.models.moe_variants import sparse_layers, with_fused_experts

VARIANTS = {
    "top-2-renormalised": ({"num_experts_per_tok": 2, "norm_topk_prob": True}, None),
    "top-4": ({"num_experts_per_tok": 4}, None),
    "shared-expert-gate-scaled": ({}, {"shared_expert_gate.weight": 4.0}),
}


def test_logits_match_hf_with_the_middle_layer_dense(checkpoint_dir):
    path = checkpoint_dir("qwen2_moe")
    assert_matches_hf(path)
    assert sparse_layers(load_tiny(path)) == [True, False, True]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_matches_hf_and_changes_the_output(checkpoint_dir, tmp_path, name):
    config, tensors = VARIANTS[name]
    base = checkpoint_dir("qwen2_moe")
    assert_matches_hf(with_config(tmp_path, base, config, tensors), base)


def test_stacked_expert_tensors_load_like_per_expert_ones(checkpoint_dir, tmp_path):
    base = checkpoint_dir("qwen2_moe")
    fused = with_fused_experts(tmp_path, base, "gate_proj", "up_proj", "down_proj")
    torch.testing.assert_close(prefill_logits(load_tiny(fused), LONG_PROMPT), hf_logits(str(base)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "experts-distributed"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, expert_parallel):
    path = checkpoint_dir("qwen2_moe")
    expected = hf_logits(str(path))
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT, expert_parallel):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
