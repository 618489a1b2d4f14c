"""The Gemma 4 part of the GGUF test-file writer (:mod:`llmserve.testing.gguf_files`): the ``gemma4`` metadata
keys, the ``rope_freqs`` tensor of proportional rotary and the tensor names the ``gguf`` package's map lacks, as
llama.cpp's converter (``Gemma4Model``) writes them."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

# The converter's factor for a pair of the full layers' heads left unrotated (proportional rotary).
_UNROTATED = 1e30
# Checkpoint tensors under ``model.layers.N.`` the gguf package's name map does not name -> the converter's name.
_OWN_NAMES = {"layer_scalar": "layer_output_scale.weight", "router.scale": "ffn_gate_inp.scale",
              "router.per_expert_scale": "ffn_down_exps.scale", "experts.gate_up_proj": "ffn_gate_up_exps.weight",
              "experts.down_proj": "ffn_down_exps.weight"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def add_gemma4_keys(writer: Any, config: dict) -> None:
    """Gemma 4's keys as the converter writes them; refused where llama.cpp would run the checkpoint
    differently: its KV-sharing layers read the last two layers holding a cache (a sliding one, then a full
    one), it rotates the sliding layers' whole heads and the full layers' proportionally, and it runs GELU
    without biases."""
    layers, types = config["num_hidden_layers"], config["layer_types"]
    shared = config.get("num_kv_shared_layers") or 0
    first_shared = layers - shared
    if shared and types[first_shared - 2:first_shared] != ["sliding_attention", "full_attention"]:
        raise ValueError(f"llama.cpp's gemma4 KV-sharing layers read layers {first_shared - 2} (sliding) and "
                         f"{first_shared - 1} (full): a GGUF file cannot describe layer types {types} with "
                         f"{shared} sharing")
    rope = config["rope_parameters"]
    full, sliding = rope["full_attention"], rope["sliding_attention"]
    if full.get("rope_type") != "proportional" or sliding.get("rope_type", "default") != "default" or \
            sliding.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"the converter writes gemma4 with proportional rope on the full layers and whole-head "
                         f"rope on the sliding ones: a GGUF file cannot describe rope {rope}")
    if config.get("attention_bias") or config.get("hidden_activation") != "gelu_pytorch_tanh":
        raise ValueError("llama.cpp's gemma4 runs GELU without biases: a GGUF file cannot describe this checkpoint")
    head_dim, global_head_dim = config["head_dim"], config["global_head_dim"]
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    width = config["intermediate_size"]
    writer.add_feed_forward_length([width if i < first_shared else 2 * width for i in range(layers)]
                                   if config.get("use_double_wide_mlp") else width)
    writer.add_head_count(config["num_attention_heads"])
    kv_heads, full_kv_heads = config["num_key_value_heads"], config.get("num_global_key_value_heads")
    writer.add_head_count_kv([kv_heads if t == "sliding_attention" else full_kv_heads for t in types]
                             if config.get("attention_k_eq_v") and full_kv_heads is not None else kv_heads)
    writer.add_rope_freq_base(full["rope_theta"])
    writer.add_rope_freq_base_swa(sliding["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(global_head_dim)
    writer.add_value_length(global_head_dim)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])
    writer.add_shared_kv_layers(shared)
    writer.add_embedding_length_per_layer_input(config.get("hidden_size_per_layer_input") or 0)
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    writer.add_key_length_swa(head_dim)
    writer.add_value_length_swa(head_dim)
    if config.get("enable_moe_block"):
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["top_k_experts"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_rope_dimension_count(global_head_dim)   # the whole head: rope_freqs leaves the rest unrotated
    writer.add_rope_dimension_count_swa(head_dim)


def rope_freqs(config: dict) -> np.ndarray:
    """The full layers' proportional rotary as per-pair frequency factors: 1 for each rotated pair, then 1e30."""
    head_dim = config["global_head_dim"]
    rotated = int(head_dim * config["rope_parameters"]["full_attention"]["partial_rotary_factor"] / 2)
    return np.array([1.0] * rotated + [_UNROTATED] * (head_dim // 2 - rotated), dtype=np.float32)


def gemma4_tensor_name(names: Any, name: str) -> str | None:
    """The file's name of checkpoint tensor ``name`` (``names``: the gguf package's map for gemma4)."""
    layer = _LAYER.match(name)
    if layer and layer[2] in _OWN_NAMES:
        return f"blk.{layer[1]}.{_OWN_NAMES[layer[2]]}"
    stem, suffix = name.rsplit(".", 1)
    mapped = names.get_name(stem)
    return None if mapped is None else f"{mapped}.{suffix}"
