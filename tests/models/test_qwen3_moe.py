"""Qwen3-MoE: logits equal transformers' on the generated checkpoint (q/k norms, 9 experts, top-3 renormalised,
sparse every second layer, no shared expert) and without renormalisation, with top-1 and with every expert per
token (each changes the output); simulated tensor-parallel ranks compose to the single-rank model, with each
expert split over them or whole experts distributed (expert parallelism)."""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import load_tiny, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, hf_logits, with_config
from tests.models.moe_variants import sparse_layers

VARIANTS = {
    "not-renormalised": {"norm_topk_prob": False},
    "top-1": {"num_experts_per_tok": 1},
    "every-expert": {"num_experts_per_tok": 9},
}


def test_logits_match_hf_sparse_every_second_layer(checkpoint_dir):
    path = checkpoint_dir("qwen3_moe")
    assert_matches_hf(path)
    model = load_tiny(path)
    assert sparse_layers(model) == [False, True]
    assert model.model.layers[1].mlp.shared_expert is None


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_matches_hf_and_changes_the_output(checkpoint_dir, tmp_path, name):
    base = checkpoint_dir("qwen3_moe")
    assert_matches_hf(with_config(tmp_path, base, VARIANTS[name]), base)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "experts-distributed"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, expert_parallel):
    path = checkpoint_dir("qwen3_moe")
    expected = hf_logits(str(path))
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT, expert_parallel):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
