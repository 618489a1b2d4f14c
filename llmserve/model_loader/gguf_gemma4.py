"""Gemma 4 GGUF files (llama.cpp's ``gemma4``), whose config transformers' GGUF support cannot build (its
config class refuses the per-layer arrays the converter writes).

* The config comes from the ``gemma4.*`` keys: the sliding / full layer of each index
  (``attention.sliding_window_pattern``), their head sizes (``key_length_swa`` / ``key_length``) and KV heads
  (``head_count_kv``, per layer where the full layers' count differs: ``attention_k_eq_v`` models), the layers
  sharing K/V (``shared_kv_layers``) and their MLP width (``feed_forward_length`` per layer: double-wide),
  per-layer inputs (``embedding_length_per_layer_input``), each kind's rope base, the window and the final soft-cap.
  What llama.cpp infers rather than reads, inferred the same way: ``attention_k_eq_v`` from full layers without
  ``attn_v``, the MoE block from ``ffn_gate_inp`` (its sizes from the expert keys), GELU, an attention scale of
  1. Proportional rotary on the full layers is the ``rope_freqs`` tensor: a factor of 1 for each rotated pair,
  1e30 (no rotation) for the rest; the sliding layers rotate whole heads. A file whose rope the converter could
  not have written from a Gemma 4 (partial sliding rotary, rope scaling) is refused, naming it.
* The tensors keep Gemma 4's checkpoint names; nothing is reshuffled or shifted (norms are stored as the weights
  Gemma 4 multiplies by), the experts stay stacked as the checkpoint stacks them (``ffn_gate_up_exps``; kept
  packed, each expert's rows are split out: :func:`~llmserve.model_loader.gguf_experts.whole_stack_experts`), the
  router's two scales are ``ffn_gate_inp.scale`` and ``ffn_down_exps.scale``, each layer's scalar
  ``layer_output_scale``.
* A KV-sharing layer reads the last earlier layer of its kind, as transformers runs the checkpoint; llama.cpp
  assumes the last two layers that hold a cache are a sliding then a full one (layers ``k - 2`` and ``k - 1``).
  Where a file's layout makes the two differ, the start-up log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from llmserve.model_loader.gguf_names import checkpoint_names

logger = logging.getLogger(__name__)

# A layer's tensors (``blk.N.<key>``) -> the checkpoint name under ``model.layers.N.``.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",   # the converter's --fuse-qkv
    "attn_output.weight": "self_attn.o_proj.weight", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "layer_output_scale.weight": "layer_scalar",
    "inp_gate.weight": "per_layer_input_gate.weight", "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    "ffn_gate_inp.weight": "router.proj.weight", "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj", "ffn_down_exps.weight": "experts.down_proj",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight",
                 "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
                 "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
                 "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight"}
# The keys the converter always writes (or with the experts), without which the config cannot be built.
_REQUIRED = {"block_count", "embedding_length", "attention.head_count", "attention.key_length",
             "attention.sliding_window", "context_length", "attention.layer_norm_rms_epsilon", "rope.freq_base",
             "expert_used_count", "expert_feed_forward_length"}
ROPE_FREQS = "rope_freqs.weight"   # read into the config, not a weight
_UNROTATED_ABOVE = 1e29   # the converter's factor for a pair left unrotated is 1e30


def gemma4_config(meta: Any) -> dict[str, Any]:
    """The Hugging Face config (``gemma4_text``) of a gemma4 file (``meta``: its metadata, as
    :mod:`~llmserve.model_loader.gguf_config` reads it)."""

    def field(key: str) -> Any:
        value = meta.arch_field(key)
        if value is None and key in _REQUIRED:
            raise ValueError(f"{meta.path.name}: gemma4 file without {meta.arch}.{key}")
        return value

    layers = int(field("block_count"))
    sliding = [bool(s) for s in meta.arch_values("attention.sliding_window_pattern")]
    if len(sliding) != layers:
        raise ValueError(f"{meta.path.name}: gemma4 sliding_window_pattern has {len(sliding)} entries for {layers} "
                         f"layers")
    layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    shared = int(field("attention.shared_kv_layers") or 0)
    kv_heads = _per_layer(meta, "attention.head_count_kv", layers)
    widths = _per_layer(meta, "feed_forward_length", layers)
    first_full = layer_types.index("full_attention") if "full_attention" in layer_types else None
    k_eq_v = first_full is not None and bool(meta.tensors(f"blk.{first_full}.attn_k.")) and not (
        meta.tensors(f"blk.{first_full}.attn_v.") or meta.tensors(f"blk.{first_full}.attn_qkv."))
    sliding_kv = {kv_heads[i] for i, s in enumerate(sliding) if s} or {kv_heads[0]}
    full_kv = {kv_heads[i] for i, s in enumerate(sliding) if not s} or sliding_kv
    if len(sliding_kv) != 1 or len(full_kv) != 1 or (full_kv != sliding_kv and not k_eq_v):
        raise ValueError(f"{meta.path.name}: gemma4 KV heads per layer {kv_heads}: Gemma 4 has one count for the "
                         f"sliding layers and, with attention_k_eq_v (full layers without attn_v), one for the full")
    width = widths[0]
    double_wide = _double_wide(meta, widths, layers - shared)
    vocab = int(meta.tensors("token_embd.")[0].shape[1])
    per_layer = int(field("embedding_length_per_layer_input") or 0)
    per_layer_vocab = meta.tensors("per_layer_token_embd.")   # the converter trims only token_embd to the vocab
    experts = field("expert_count")
    moe = bool(meta.tensors("blk.0.ffn_gate_inp."))
    if moe != bool(experts):
        raise ValueError(f"{meta.path.name}: gemma4 file with{'' if moe else 'out'} routers (ffn_gate_inp) but "
                         f"expert_count {experts}")
    config = {
        "model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"], "vocab_size": vocab,
        "hidden_size": int(field("embedding_length")), "intermediate_size": width, "num_hidden_layers": layers,
        "num_attention_heads": int(field("attention.head_count")), "num_key_value_heads": next(iter(sliding_kv)),
        "head_dim": int(field("attention.key_length_swa") or field("attention.key_length")),
        "global_head_dim": int(field("attention.key_length")),
        "attention_k_eq_v": k_eq_v, "num_global_key_value_heads": next(iter(full_kv)) if k_eq_v else None,
        "layer_types": layer_types, "sliding_window": int(field("attention.sliding_window")),
        "num_kv_shared_layers": shared, "use_double_wide_mlp": double_wide,
        "hidden_size_per_layer_input": per_layer,
        "vocab_size_per_layer_input": int(per_layer_vocab[0].shape[1]) if per_layer_vocab else vocab,
        "max_position_embeddings": int(field("context_length")),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon")), "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "tie_word_embeddings": not meta.tensors("output.weight"),
        "final_logit_softcapping": float(field("final_logit_softcapping") or 0) or None,
        "rope_parameters": _rope(meta), "enable_moe_block": moe,
        "bos_token_id": meta.field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.field("tokenizer.ggml.eos_token_id"),
    }
    if moe:
        config.update(num_experts=int(experts), top_k_experts=int(field("expert_used_count")),
                      moe_intermediate_size=int(field("expert_feed_forward_length")))
    _warn_if_llama_cpp_shares_differently(meta, layer_types, shared)
    return config


def _per_layer(meta: Any, key: str, layers: int) -> list[int]:
    """A key the converter writes as one number or as one per layer."""
    values = [int(v) for v in meta.arch_values(key)]
    return values * layers if len(values) == 1 else values


def _double_wide(meta: Any, widths: list[int], first_shared: int) -> bool:
    """Whether the KV-sharing layers' MLPs are twice the others' (``use_double_wide_mlp``), the one per-layer
    width Gemma 4 has."""
    if first_shared < 1:
        raise ValueError(f"{meta.path.name}: gemma4 file whose {len(widths)} layers all share K/V: none holds any")
    rest, shared = set(widths[:first_shared]), set(widths[first_shared:])
    if len(rest) == 1 and shared <= rest | {2 * widths[0]} and len(shared) <= 1:
        return shared == {2 * widths[0]}
    raise ValueError(f"{meta.path.name}: gemma4 MLP widths per layer {widths}: Gemma 4 has one width, doubled "
                     f"only for the KV-sharing layers")


def _rope(meta: Any) -> dict[str, Any]:
    """Each layer kind's rope: the sliding layers' plain; the full layers' proportional where the file holds
    ``rope_freqs`` (its rotated pairs, the first ones, over the whole head's frequencies)."""
    full_base = float(meta.arch_field("rope.freq_base"))
    sliding = {"rope_type": "default", "rope_theta": float(meta.arch_field("rope.freq_base_swa") or full_base)}
    head_dim = int(meta.arch_field("attention.key_length"))
    sliding_head = meta.arch_field("attention.key_length_swa")
    rotated_sliding = meta.arch_field("rope.dimension_count_swa")
    if meta.arch_field("rope.scaling.type") not in (None, "none") or (
            rotated_sliding is not None and sliding_head is not None and int(rotated_sliding) != int(sliding_head)):
        raise ValueError(f"{meta.path.name}: gemma4 rope with scaling {meta.arch_field('rope.scaling.type')!r} or "
                         f"{rotated_sliding} of {sliding_head} sliding dimensions rotated: llmserve runs Gemma 4's "
                         f"rope (whole sliding heads, proportional full layers) only")
    freqs = meta.tensors(ROPE_FREQS)
    if not freqs:
        return {"sliding_attention": sliding, "full_attention": {"rope_type": "default", "rope_theta": full_base}}
    factors = np.asarray(freqs[0].data, dtype=np.float32)
    rotated = int(np.count_nonzero(factors == 1.0))
    if factors.shape != (head_dim // 2,) or not (np.all(factors[:rotated] == 1.0)
                                                 and np.all(factors[rotated:] > _UNROTATED_ABOVE)):
        raise ValueError(f"{meta.path.name}: gemma4 rope_freqs is not proportional rotary (ones, then pairs left "
                         f"unrotated, one per pair of the {head_dim} full-layer dimensions): llmserve runs Gemma 4's "
                         f"proportional rope only")
    return {"sliding_attention": sliding, "full_attention": {"rope_type": "proportional", "rope_theta": full_base,
                                                             "partial_rotary_factor": 2 * rotated / head_dim}}


def _warn_if_llama_cpp_shares_differently(meta: Any, layer_types: list[str], shared: int) -> None:
    first_shared = len(layer_types) - shared
    if not shared or first_shared < 2:
        return
    own = layer_types[:first_shared]
    transformers_source = {kind: first_shared - 1 - own[::-1].index(kind) for kind in set(own)}
    llama_cpp_source = {"sliding_attention": first_shared - 2, "full_attention": first_shared - 1}
    if any(transformers_source.get(kind) != llama_cpp_source[kind] for kind in set(layer_types[first_shared:])):
        logger.warning("%s: its KV-sharing layers read the last earlier layer of their kind (%s), as transformers "
                       "runs the checkpoint; llama.cpp reads layers %d (sliding) and %d (full), so its tokens may "
                       "differ", meta.path.name, transformers_source, first_shared - 2, first_shared - 1)


def gemma4_names(tensor_names: Iterable[str]) -> dict[str, str]:
    """GGUF tensor name -> checkpoint name, for every tensor but ``rope_freqs`` (read into the config)."""
    return checkpoint_names(tensor_names, _LAYER_NAMES, _GLOBAL_NAMES)


def values_from_keys(weight_types: dict[str, str], config: dict[str, Any]) -> dict[str, str]:
    """The file's linear weights by type (checkpoint name -> GGUF type), with ``attention_k_eq_v``'s values:
    a full layer without ``v_proj`` loads its keys' rows as its values too (the model does), so its fused
    projection packs when its ``q_proj`` and ``k_proj`` do."""
    if not config.get("attention_k_eq_v"):
        return weight_types
    values = {name.replace(".self_attn.k_proj.", ".self_attn.v_proj."): kind for name, kind in weight_types.items()
              if name.endswith(".self_attn.k_proj.weight")}
    return {**values, **weight_types}
