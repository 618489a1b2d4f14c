"""The tensors and config.json keys of the generated DeepSeek-V2/V3 checkpoints, for
:mod:`llmserve.testing.checkpoints`.

Multi-head latent attention at small sizes (a 32-dim latent, 16 no-rope + 8 rope dims per query and key head,
16-dim values), with or without the low-rank query (``q_lora_rank`` from the family's ``extra_config``; None
as in DeepSeek-V2-Lite). Layers from ``first_k_dense_replace`` on are mixture-of-experts layers in DeepSeek's
own per-expert tensor names (``mlp.experts.N.gate_proj``...), as released checkpoints store them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .checkpoint_layouts import (
    LOGIT_STD,
    NORM_INIT,
    QK_STD,
    TensorSpec,
    normal,
    stacked,
)

if TYPE_CHECKING:
    from .checkpoint_families import FamilySpec, SizeSpec

KV_LORA_RANK = 32
QK_NOPE_HEAD_DIM = 16
QK_ROPE_HEAD_DIM = 8
V_HEAD_DIM = 16


def _inv(n: int) -> float:
    return 1.0 / math.sqrt(n)


def moe_layers(fam: FamilySpec, sz: SizeSpec) -> list[int]:
    """The decoder layers transformers builds as mixture-of-experts layers (from ``first_k_dense_replace`` on)."""
    first = fam.extra_config.get("first_k_dense_replace", sz.num_hidden_layers)
    return list(range(first, sz.num_hidden_layers))


def deepseek_tensors(fam: FamilySpec, sz: SizeSpec) -> list[TensorSpec]:
    """In DeepSeek's checkpoint names (transformers stacks the experts when it loads them)."""
    h, v, heads = sz.hidden_size, sz.vocab_size, sz.num_attention_heads
    q_lora = fam.extra_config.get("q_lora_rank")
    qk_dim = QK_NOPE_HEAD_DIM + QK_ROPE_HEAD_DIM
    experts = fam.extra_config.get("n_routed_experts", 0)
    moe_inter = fam.extra_config.get("moe_intermediate_size", sz.intermediate_size)
    shared_inter = moe_inter * fam.extra_config.get("n_shared_experts", 0)
    moe = set(moe_layers(fam, sz))
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), normal(1.0))]
    for i in range(sz.num_hidden_layers):
        p = f"model.layers.{i}."
        if q_lora is None:
            specs.append(TensorSpec(p + "self_attn.q_proj.weight", (heads * qk_dim, h), normal(QK_STD * _inv(h))))
        else:
            specs += [TensorSpec(p + "self_attn.q_a_proj.weight", (q_lora, h), normal(_inv(h))),
                      TensorSpec(p + "self_attn.q_a_layernorm.weight", (q_lora,), NORM_INIT),
                      TensorSpec(p + "self_attn.q_b_proj.weight", (heads * qk_dim, q_lora),
                                 normal(QK_STD * _inv(q_lora)))]
        specs += [
            TensorSpec(p + "self_attn.kv_a_proj_with_mqa.weight", (KV_LORA_RANK + QK_ROPE_HEAD_DIM, h),
                       stacked((KV_LORA_RANK, normal(_inv(h))), (QK_ROPE_HEAD_DIM, normal(QK_STD * _inv(h))))),
            TensorSpec(p + "self_attn.kv_a_layernorm.weight", (KV_LORA_RANK,), NORM_INIT),
            TensorSpec(p + "self_attn.kv_b_proj.weight", (heads * (QK_NOPE_HEAD_DIM + V_HEAD_DIM), KV_LORA_RANK),
                       stacked(*[(QK_NOPE_HEAD_DIM, normal(QK_STD * _inv(KV_LORA_RANK))),
                                 (V_HEAD_DIM, normal(_inv(KV_LORA_RANK)))] * heads)),
            TensorSpec(p + "self_attn.o_proj.weight", (h, heads * V_HEAD_DIM), normal(_inv(heads * V_HEAD_DIM))),
        ]
        if i in moe:
            specs.append(TensorSpec(p + "mlp.gate.weight", (experts, h), normal(_inv(h))))
            if fam.extra_config.get("topk_method") == "noaux_tc":
                specs.append(TensorSpec(p + "mlp.gate.e_score_correction_bias", (experts,), normal(0.1)))
            for e in range(experts):
                specs += _mlp(f"{p}mlp.experts.{e}.", h, moe_inter)
            if shared_inter:
                specs += _mlp(f"{p}mlp.shared_experts.", h, shared_inter)
        else:
            specs += _mlp(f"{p}mlp.", h, sz.intermediate_size)
        specs += [TensorSpec(p + "input_layernorm.weight", (h,), NORM_INIT),
                  TensorSpec(p + "post_attention_layernorm.weight", (h,), NORM_INIT)]
    specs += [TensorSpec("model.norm.weight", (h,), NORM_INIT),
              TensorSpec("lm_head.weight", (v, h), normal(LOGIT_STD / math.sqrt(h)))]
    return specs


def _mlp(prefix: str, hidden: int, inner: int) -> list[TensorSpec]:
    return [TensorSpec(prefix + "gate_proj.weight", (inner, hidden), normal(_inv(hidden))),
            TensorSpec(prefix + "up_proj.weight", (inner, hidden), normal(_inv(hidden))),
            TensorSpec(prefix + "down_proj.weight", (hidden, inner), normal(_inv(inner)))]


def deepseek_config(fam: FamilySpec, sz: SizeSpec, bos_id: int, eos_id: int) -> dict[str, Any]:
    """The MLA sizes above, the family's rope (plain, or its ``rope_scaling``) and its MoE keys (``extra_config``)."""
    rope = {**(fam.rope_scaling or {"rope_type": "default"}), "rope_theta": fam.rope_theta}
    return {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "first_k_dense_replace": sz.num_hidden_layers, "hidden_act": "silu", "hidden_size": sz.hidden_size,
        "initializer_range": 0.02, "intermediate_size": sz.intermediate_size, "kv_lora_rank": KV_LORA_RANK,
        "max_position_embeddings": sz.max_position_embeddings, "num_attention_heads": sz.num_attention_heads,
        "num_hidden_layers": sz.num_hidden_layers, "num_key_value_heads": sz.num_attention_heads,
        "q_lora_rank": None, "qk_nope_head_dim": QK_NOPE_HEAD_DIM, "qk_rope_head_dim": QK_ROPE_HEAD_DIM,
        "rms_norm_eps": fam.rms_norm_eps, "rope_parameters": rope, "use_cache": True,
        "v_head_dim": V_HEAD_DIM, "vocab_size": sz.vocab_size,
    }
