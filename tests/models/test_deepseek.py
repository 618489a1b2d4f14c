"""DeepSeek-V2/V3: multi-head latent attention (queries with and without ``q_lora_rank``, interleaved and
rotate-half rope on the rope dims, YaRN with ``mscale_all_dim`` in the softmax scale) and the MoE layers (V2's greedy
and group-limited routing, V3's sigmoid + correction bias, routed scaling, shared experts) are computed as
transformers computes them, and each choice changes the output; the KV cache holds one latent + rope key per token
and layer, so the same memory holds more tokens than per-head K and V would; tensor-parallel ranks compose to the
single-rank model; what llmserve cannot run is refused."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.models.deepseek_v2 import is_moe_layer
from llmserve.models.llama import UnsupportedModelConfigError
from llmserve.testing.checkpoint_layout_deepseek import (
    KV_LORA_RANK,
    QK_NOPE_HEAD_DIM,
    QK_ROPE_HEAD_DIM,
    V_HEAD_DIM,
)
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, with_config

FAMILIES = ["deepseek_v2_lite", "deepseek_v2", "deepseek_v3"]
V3_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "mscale": 1.0,
           "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}
# (family, config changes, tensors rescaled): each changes transformers' output.
VARIANTS = {
    "v2-greedy-routing": ("deepseek_v2", {"topk_method": "greedy"}, None),
    "v2-unscaled-routing": ("deepseek_v2", {"routed_scaling_factor": 1.0}, None),
    "v2-lite-shared-experts-add-nothing": ("deepseek_v2_lite", {}, {"shared_experts.down_proj.weight": 0.0}),
    "v3-rotate-half-rope": ("deepseek_v3", {"rope_interleave": False}, None),
    "v3-no-mscale-in-softmax-scale": ("deepseek_v3", {"rope_parameters": {**V3_YARN, "mscale_all_dim": 0}}, None),
    "v3-plain-rope": ("deepseek_v3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, None),
    "v3-no-correction-bias": ("deepseek_v3", {}, {"e_score_correction_bias": 0.0}),
    "v3-not-renormalised": ("deepseek_v3", {"norm_topk_prob": False}, None),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(checkpoint_dir, family):
    assert_matches_hf(checkpoint_dir(family))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_choice_matches_hf_and_changes_the_output(checkpoint_dir, tmp_path, name):
    family, changes, tensors = VARIANTS[name]
    base = checkpoint_dir(family)
    assert_matches_hf(with_config(tmp_path, base, changes, tensors), base)


def test_moe_layers_follow_first_k_dense_replace_and_moe_layer_freq():
    """transformers makes every layer from first_k_dense_replace on an MoE layer; DeepSeek's own code (and vLLM)
    also skips layers off ``moe_layer_freq`` (1 in every released checkpoint)."""
    config = SimpleNamespace(n_routed_experts=8, first_k_dense_replace=1, moe_layer_freq=1)
    assert [is_moe_layer(config, i) for i in range(4)] == [False, True, True, True]
    config.moe_layer_freq = 2
    assert [is_moe_layer(config, i) for i in range(4)] == [False, False, True, False]
    assert not is_moe_layer(SimpleNamespace(n_routed_experts=None, first_k_dense_replace=0), 3)


@pytest.mark.parametrize("family", ["deepseek_v2_lite", "deepseek_v3"])
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "experts-distributed"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, family, expert_parallel):
    """2 of the 4 heads per rank (q_proj / q_b_proj, kv_b_proj and o_proj sharded by head) over the latent each
    rank computes whole; the experts' intermediate rows split over the ranks, or whole experts on each (5 as
    3 + 2, 8 as 4 + 4)."""
    path = checkpoint_dir(family)
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT, expert_parallel):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_kv_cache_holds_one_latent_per_token_and_so_more_tokens(checkpoint_dir, caplog):
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (32 + 8), where per-head K and V
    of the same heads would hold heads x (nope + rope + v) = 4 x 40: the same bytes hold 4x the tokens."""
    from llmserve import LLM

    path = checkpoint_dir("deepseek_v2")
    layers, heads, block_size, budget = 3, 4, 16, 1 << 20
    with caplog.at_level(logging.INFO, logger="llmserve.engine.core"):
        llm = LLM(str(path), block_size=block_size, kv_cache_memory_bytes=budget)
    runner = llm.engine.runner
    per_token = KV_LORA_RANK + QK_ROPE_HEAD_DIM
    assert [a.kv_cache_elements_per_token() for a in runner.model.attention_layers()] == [per_token] * layers
    for attn in runner.model.attention_layers():
        assert attn.value_cache is attn.key_cache and attn.key_cache.shape[1:] == (block_size, 1, per_token)
    block_bytes = block_size * layers * per_token * 4
    assert runner.kv_cache_bytes_per_block() == block_bytes
    num_blocks = llm.engine.block_manager.num_blocks
    assert num_blocks == budget // block_bytes
    standard_block = block_size * layers * heads * (QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM + V_HEAD_DIM) * 4
    assert num_blocks >= 4 * (budget // standard_block)
    assert f"KV cache: {num_blocks} blocks of {block_size} tokens = {num_blocks * block_size} tokens" in caplog.text


@pytest.mark.parametrize("changes,match", [
    ({"num_key_value_heads": 2}, "no KV-head groups"),
    ({"topk_method": "random"}, "unknown topk_method 'random'"),
])
def test_what_llmserve_cannot_run_is_refused(checkpoint_dir, tmp_path, changes, match):
    with pytest.raises(UnsupportedModelConfigError, match=match):
        load_tiny(with_config(tmp_path, checkpoint_dir("deepseek_v2"), changes))


def test_v3_multi_token_prediction_layers_are_skipped(checkpoint_dir, tmp_path):
    """DeepSeek-V3 checkpoints carry the multi-token-prediction module as layer ``num_hidden_layers``; the model
    does not run it, and loads as if it were not there."""
    base = checkpoint_dir("deepseek_v3")
    path = shutil.copytree(base, tmp_path / "with-mtp")
    weights = load_file(str(path / "model.safetensors"))
    weights.update({"model.layers.3.eh_proj.weight": torch.ones(64, 128),
                    "model.layers.3.self_attn.kv_a_layernorm.weight": torch.ones(32)})
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(prefill_logits(load_tiny(path), LONG_PROMPT),
                               prefill_logits(load_tiny(base), LONG_PROMPT))


def test_parallel_samples_copy_the_latent_cache_on_write(checkpoint_dir):
    """n = 2 greedy samples share the prompt's blocks and copy its last partial block before writing into it (one
    cache tensor per layer, keys and values alike): both equal transformers' greedy output."""
    from llmserve import LLM, SamplingParams
    from tests.engine.test_hf_equivalence import PROMPTS
    from tests.engine.test_hf_equivalence import assert_matches_hf as assert_generation_matches_hf

    path = checkpoint_dir("deepseek_v2_lite")
    llm = LLM(str(path), block_size=4, kv_cache_memory_bytes="4MiB")
    outputs = llm.generate(PROMPTS[:2], SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True,
                                                       logprobs=0))
    for out in outputs:
        assert len(out.outputs) == 2 and out.outputs[0].token_ids == out.outputs[1].token_ids
    assert_generation_matches_hf(path, outputs, max_tokens=8)
