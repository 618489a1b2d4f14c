"""The tensors and config.json keys of the generated Gemma 4 (text) checkpoints, for
:mod:`llmserve.testing.checkpoints`.

Every size gets both layer types (every third layer full), the last third of the layers sharing K/V
(``num_kv_shared_layers``, with double-wide MLPs), per-layer inputs of 8 per layer, full layers with their
own head size (1.5 x head_dim), one KV head whose values are its keys (``attention_k_eq_v``) and
proportional rotary on a quarter of their dims, a 10-token window and a final-logit soft-cap of 15.
Norms scale by ``w`` (centred on 1); the post-norms set each branch's weight in the residual stream.

With ``enable_moe_block`` in the family's config (``gemma4_moe``), every layer also has the router and the
stacked experts (``num_experts`` of ``moe_intermediate_size``) and the block's three norms; the router's
scales are spread around 1, so that each of them changes which experts win and with what weight.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .checkpoint_layout_moe import ROUTER_LOGIT_STD
from .checkpoint_layouts import LOGIT_STD, NORM_INIT, QK_STD, TensorSpec, normal

if TYPE_CHECKING:
    from .checkpoint_families import FamilySpec, SizeSpec

PER_LAYER_SIZE = 8
# q/k norm weights: the attention scale is 1, so these set the scores' spread (about 1 with half-unit norms;
# unit norms make the softmax sharp enough that float32 rounding reaches the logits' 1e-4 tolerance).
QK_NORM_INIT = normal(0.1, mean=0.5)
SLIDING_WINDOW = 10


def _inv(n: int) -> float:
    return 1.0 / math.sqrt(n)


def layer_types(num_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % 3 == 0 or i == num_layers - 1 else "sliding_attention"
            for i in range(num_layers)]


def num_kv_shared_layers(num_layers: int) -> int:
    return num_layers // 3


def global_head_dim(sz: SizeSpec) -> int:
    return 3 * (sz.head_dim or sz.hidden_size // sz.num_attention_heads) // 2


def moe_block_tensors(fam: FamilySpec, sz: SizeSpec, prefix: str) -> list[TensorSpec]:
    """One layer's router, stacked experts and the block's norms, as ``Gemma4TextDecoderLayer`` holds them. The
    router's input has an RMS of ``hidden_size ** -0.5``, so ``ROUTER_LOGIT_STD`` is its weights' own spread."""
    h, e, inter = sz.hidden_size, fam.extra_config["num_experts"], fam.extra_config["moe_intermediate_size"]
    return [TensorSpec(prefix + "router.proj.weight", (e, h), normal(ROUTER_LOGIT_STD)),
            TensorSpec(prefix + "router.scale", (h,), normal(0.2, mean=1.0)),
            TensorSpec(prefix + "router.per_expert_scale", (e,), normal(0.2, mean=1.0)),
            TensorSpec(prefix + "experts.gate_up_proj", (e, 2 * inter, h), normal(_inv(h))),
            TensorSpec(prefix + "experts.down_proj", (e, h, inter), normal(_inv(inter))),
            TensorSpec(prefix + "post_feedforward_layernorm_1.weight", (h,), NORM_INIT),
            TensorSpec(prefix + "post_feedforward_layernorm_2.weight", (h,), NORM_INIT),
            TensorSpec(prefix + "pre_feedforward_layernorm_2.weight", (h,), NORM_INIT)]


def gemma4_tensors(fam: FamilySpec, sz: SizeSpec) -> list[TensorSpec]:
    """In the order transformers' ``state_dict()`` lists them; layers that share K/V have no K/V weights, and
    full layers no ``v_proj``."""
    h, v, n, p = sz.hidden_size, sz.vocab_size, sz.num_hidden_layers, PER_LAYER_SIZE
    types, first_shared = layer_types(n), n - num_kv_shared_layers(n)
    out_std = LOGIT_STD / math.sqrt(h)
    post_norm = normal(0.1, mean=fam.branch_gain)
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), normal(out_std if fam.tie_word_embeddings else 1.0))]
    for i in range(n):
        pre = f"model.layers.{i}."
        full = types[i] == "full_attention"
        head_dim = global_head_dim(sz) if full else (sz.head_dim or h // sz.num_attention_heads)
        q_out, kv_out = sz.num_attention_heads * head_dim, (1 if full else sz.num_key_value_heads) * head_dim
        inter = sz.intermediate_size * (2 if i >= first_shared else 1)
        specs += [TensorSpec(pre + "self_attn.q_proj.weight", (q_out, h), normal(QK_STD * _inv(h))),
                  TensorSpec(pre + "self_attn.q_norm.weight", (head_dim,), QK_NORM_INIT)]
        if i < first_shared:
            specs += [TensorSpec(pre + "self_attn.k_norm.weight", (head_dim,), QK_NORM_INIT),
                      TensorSpec(pre + "self_attn.k_proj.weight", (kv_out, h), normal(QK_STD * _inv(h)))]
            if not full:
                # Values of RMS ~2, so that the value norm (to RMS 1) is seen.
                specs.append(TensorSpec(pre + "self_attn.v_proj.weight", (kv_out, h), normal(2 * _inv(h))))
        specs += [
            TensorSpec(pre + "self_attn.o_proj.weight", (h, q_out), normal(_inv(q_out))),
            TensorSpec(pre + "mlp.gate_proj.weight", (inter, h), normal(_inv(h))),
            TensorSpec(pre + "mlp.up_proj.weight", (inter, h), normal(_inv(h))),
            TensorSpec(pre + "mlp.down_proj.weight", (h, inter), normal(_inv(inter))),
            TensorSpec(pre + "input_layernorm.weight", (h,), NORM_INIT),
            TensorSpec(pre + "post_attention_layernorm.weight", (h,), post_norm),
            TensorSpec(pre + "pre_feedforward_layernorm.weight", (h,), NORM_INIT),
            TensorSpec(pre + "post_feedforward_layernorm.weight", (h,), post_norm),
            TensorSpec(pre + "layer_scalar", (1,), normal(0.05, mean=1.0)),
            TensorSpec(pre + "per_layer_input_gate.weight", (p, h), normal(_inv(h))),
            TensorSpec(pre + "per_layer_projection.weight", (h, p), normal(_inv(p))),
            TensorSpec(pre + "post_per_layer_input_norm.weight", (h,), normal(0.1, mean=fam.branch_gain / 2)),
        ]
        if fam.extra_config.get("enable_moe_block"):
            specs += moe_block_tensors(fam, sz, pre)
    specs += [TensorSpec("model.norm.weight", (h,), NORM_INIT),
              TensorSpec("model.embed_tokens_per_layer.weight", (v, n * p), normal(_inv(p))),
              TensorSpec("model.per_layer_model_projection.weight", (n * p, h), normal(_inv(h))),
              TensorSpec("model.per_layer_projection_norm.weight", (p,), NORM_INIT)]
    if not fam.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, h), normal(out_std)))
    return specs


def gemma4_config(fam: FamilySpec, sz: SizeSpec, bos_id: int, eos_id: int) -> dict[str, Any]:
    n = sz.num_hidden_layers
    return {
        "attention_bias": False, "attention_dropout": 0.0, "attention_k_eq_v": True, "bos_token_id": bos_id,
        "enable_moe_block": False, "eos_token_id": eos_id, "final_logit_softcapping": 15.0,
        "global_head_dim": global_head_dim(sz), "head_dim": sz.head_dim or sz.hidden_size // sz.num_attention_heads,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": sz.hidden_size,
        "hidden_size_per_layer_input": PER_LAYER_SIZE, "initializer_range": 0.02,
        "intermediate_size": sz.intermediate_size, "layer_types": layer_types(n),
        "max_position_embeddings": sz.max_position_embeddings, "num_attention_heads": sz.num_attention_heads,
        "num_global_key_value_heads": 1, "num_hidden_layers": n, "num_key_value_heads": sz.num_key_value_heads,
        "num_kv_shared_layers": num_kv_shared_layers(n), "rms_norm_eps": fam.rms_norm_eps,
        "rope_parameters": {
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": fam.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "sliding_window": SLIDING_WINDOW, "use_cache": True, "use_double_wide_mlp": True,
        "vocab_size": sz.vocab_size, "vocab_size_per_layer_input": sz.vocab_size,
    }
