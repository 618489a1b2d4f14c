"""Mixtral: logits equal transformers' on the generated checkpoint (5 experts, top-2) and with top-1, top-3 and
every expert per token (each changes the output, so routing is not a no-op); transformers 5's stacked expert
tensors load like the per-expert ones; a missing expert is named; simulated tensor-parallel ranks compose to
the single-rank model, with each expert split over them or whole experts distributed (expert parallelism)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.models.llama import CheckpointMismatchError
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, hf_logits, with_config
from tests.models.moe_variants import sparse_layers, with_fused_experts


@pytest.mark.parametrize("top_k", [2, 1, 3, 5])
def test_logits_match_hf_and_top_k_changes_them(checkpoint_dir, tmp_path, top_k):
    base = checkpoint_dir("mixtral")
    if top_k == 2:
        assert_matches_hf(base)
        assert sparse_layers(load_tiny(base)) == [True, True]
    else:
        assert_matches_hf(with_config(tmp_path, base, {"num_experts_per_tok": top_k}), base)


def test_stacked_expert_tensors_load_like_per_expert_ones(checkpoint_dir, tmp_path):
    base = checkpoint_dir("mixtral")
    fused = with_fused_experts(tmp_path, base, "w1", "w3", "w2")
    torch.testing.assert_close(prefill_logits(load_tiny(fused), LONG_PROMPT), hf_logits(str(base)),
                               atol=1e-4, rtol=1e-4)


def test_a_missing_expert_tensor_is_named(checkpoint_dir, tmp_path):
    import shutil

    path = shutil.copytree(checkpoint_dir("mixtral"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.mlp\.experts\.w13_weight \(shard \(3, 'w3'\)\)"):
        load_tiny(path)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "experts-distributed"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, expert_parallel):
    path = checkpoint_dir("mixtral")
    expected = hf_logits(str(path))
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT, expert_parallel):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
