"""The DeepSeek-V2/V3 part of the GGUF test-file writer (:mod:`llmserve.testing.gguf_files`): the ``deepseek2``
metadata keys and the split ``kv_b_proj``, as llama.cpp's converter writes them."""

from __future__ import annotations

from typing import Any

import numpy as np


def add_deepseek_keys(writer: Any, config: dict) -> None:
    """DeepSeek's latent attention, experts and YaRN as the converter writes them (the gating function only
    from ``scoring_func``, the groups from ``n_group``); refused where the file could not describe the
    checkpoint: without ``scoring_func: sigmoid`` it would score V3's experts by softmax (and V2's by sigmoid
    with one), and llama.cpp has experts in every layer after the leading dense ones, rotates interleaved pairs,
    and reads one YaRN ``mscale`` for both of DeepSeek's. V2's ``group_limited_greedy`` is written as the
    converter writes it (softmax gating and the group counts), which a loader runs as V2's routing."""
    import gguf

    sigmoid = config["model_type"] == "deepseek_v3"   # llmserve's (and transformers') V3 router
    if (config.get("scoring_func") == "sigmoid") != sigmoid:
        raise ValueError(f"llama.cpp scores deepseek2 experts by sigmoid only with scoring_func sigmoid; this "
                         f"{config['model_type']} checkpoint's scoring_func is {config.get('scoring_func')}")
    groups, used = config.get("n_group") or 1, config.get("topk_group") or 1
    if not sigmoid and used < groups and config.get("topk_method") != "group_limited_greedy":
        raise ValueError(f"the converter writes n_group, which limits the experts to the best groups: a GGUF file "
                         f"cannot describe this checkpoint's {config.get('topk_method')} over {groups} groups")
    if config.get("moe_layer_freq", 1) != 1 or (sigmoid and not config.get("rope_interleave", True)):
        raise ValueError("llama.cpp's deepseek2 has experts in every layer after the leading dense ones and rotates "
                         "interleaved pairs: a GGUF file cannot describe this checkpoint")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", "yarn") or (
            rope.get("rope_type") == "yarn" and rope.get("mscale", 1.0) != rope.get("mscale_all_dim")):
        raise ValueError(f"llama.cpp's deepseek2 runs YaRN with mscale = mscale_all_dim only: a GGUF file cannot "
                         f"describe rope {rope}")
    experts = config.get("n_routed_experts")
    writer.add_leading_dense_block_count(config.get("first_k_dense_replace") or
                                         (0 if experts else config["num_hidden_layers"]))
    writer.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(config["q_lora_rank"])
    rank, rope_dim = config["kv_lora_rank"], config["qk_rope_head_dim"]
    writer.add_kv_lora_rank(rank)
    writer.add_key_length(rank + rope_dim)   # the per-head sizes of llama.cpp's MQA view, then DeepSeek's own
    writer.add_value_length(rank)
    writer.add_key_length_mla(config["qk_nope_head_dim"] + rope_dim)
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_expert_feed_forward_length(config.get("moe_intermediate_size") or config["intermediate_size"])
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("n_group") is not None:
        writer.add_expert_group_count(config["n_group"])
        writer.add_expert_group_used_count(config["topk_group"])
    if config.get("scoring_func"):
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType[config["scoring_func"].upper()])
    writer.add_expert_shared_count(config.get("n_shared_experts") or 0)
    if config.get("routed_scaling_factor") is not None:
        writer.add_expert_weights_scale(config["routed_scaling_factor"])
    if config.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(rope_dim)
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", 32.0))
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", 1.0))
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def latent_up_halves(gguf_name: str, data: np.ndarray, config: dict) -> list[tuple[str, np.ndarray]]:
    """DeepSeek's ``kv_b_proj`` as the converter splits it for llama.cpp's absorbed attention: per head its
    key rows transposed (``attn_k_b``, ``[heads, kv_lora_rank, qk_nope_head_dim]``) and its value rows
    (``attn_v_b``, ``[heads, v_head_dim, kv_lora_rank]``)."""
    per_head = data.reshape(config["num_attention_heads"], -1, data.shape[-1])
    keys, values = np.split(per_head, [config["qk_nope_head_dim"]], axis=1)
    return [(gguf_name.replace("attn_kv_b", "attn_k_b"), np.ascontiguousarray(keys.transpose(0, 2, 1))),
            (gguf_name.replace("attn_kv_b", "attn_v_b"), np.ascontiguousarray(values))]
