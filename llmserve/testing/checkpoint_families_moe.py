"""The generated mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, Gemma 4's MoE
block): families declared as :mod:`.checkpoint_families` declares the dense ones."""

from __future__ import annotations

import dataclasses

from .chat_templates import CHATML_TEMPLATE, MISTRAL_CHAT_TEMPLATE
from .checkpoint_families import DENSE_FAMILIES, FamilySpec
from .tokenizer_files import BYTELEVEL, SENTENCEPIECE

# The tiny DeepSeeks: 3 layers, the first dense, MoE layers of 32-wide experts after it.
DEEPSEEK_MOE = {"first_k_dense_replace": 1, "moe_layer_freq": 1, "moe_intermediate_size": 32}


MOE_FAMILIES: dict[str, FamilySpec] = {
    # Mixture of experts (layout "moe": the MLP tensors of the sparse layers replaced by a router and per-expert
    # tensors, as save_pretrained writes them). Mixtral: 5 experts of intermediate_size, top-2, renormalised.
    # bench: Mixtral's 8 experts, top-2, each half the bench Llama's MLP, so a token's active parameters are the
    # dense bench model's (compare with family mistral, size bench).
    "mixtral": FamilySpec(
        name="mixtral",
        architecture="MixtralForCausalLM",
        model_type="mixtral",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=MISTRAL_CHAT_TEMPLATE,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        layout="moe",
        extra_config={"sliding_window": None, "num_local_experts": 5, "num_experts_per_tok": 2,
                      "router_jitter_noise": 0.0, "output_router_logits": False},
        size_overrides={"tiny": {"intermediate_size": 64},
                        "bench": {"intermediate_size": 1024, "num_local_experts": 8}},
    ),
    # Qwen2-MoE: q/k/v bias; 7 experts of 32, top-1 without renormalisation, a shared expert of 96 behind a
    # sigmoid gate; 3 layers, the middle one dense (mlp_only_layers) with an MLP of intermediate_size.
    "qwen2_moe": FamilySpec(
        name="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        model_type="qwen2_moe",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        layout="moe",
        extra_config={"use_sliding_window": False, "sliding_window": None, "qkv_bias": True, "num_experts": 7,
                      "num_experts_per_tok": 1, "norm_topk_prob": False, "moe_intermediate_size": 32,
                      "shared_expert_intermediate_size": 96, "decoder_sparse_step": 1, "mlp_only_layers": [1],
                      "output_router_logits": False},
        size_overrides={"tiny": {"num_hidden_layers": 3}},
    ),
    # Qwen3-MoE: q/k norms, no shared expert; 9 experts of 32, top-3 renormalised; sparse every second layer
    # (decoder_sparse_step 2: layer 0 dense, layer 1 sparse).
    "qwen3_moe": FamilySpec(
        name="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        model_type="qwen3_moe",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        head_dim_factor=2,
        layout="moe",
        extra_config={"attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                      "num_experts": 9, "num_experts_per_tok": 3, "norm_topk_prob": True, "moe_intermediate_size": 32,
                      "decoder_sparse_step": 2, "mlp_only_layers": [], "output_router_logits": False},
    ),
    # DeepSeek-V2-Lite's shape of options: multi-head latent attention with queries straight from q_proj (no
    # q_lora_rank); a dense first layer, then 5 routed experts (softmax, greedy top-2) and 2 shared ones.
    "deepseek_v2_lite": FamilySpec(
        name="deepseek_v2_lite",
        architecture="DeepseekV2ForCausalLM",
        model_type="deepseek_v2",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        layout="deepseek",
        size_overrides={"tiny": {"num_hidden_layers": 3}},
        extra_config={"q_lora_rank": None, "mlp_bias": False, **DEEPSEEK_MOE, "n_routed_experts": 5,
                      "n_shared_experts": 2, "num_experts_per_tok": 2, "topk_method": "greedy", "n_group": 1,
                      "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0},
    ),
    # DeepSeek-V2's: low-rank queries (q_a_proj -> q_a_layernorm -> q_b_proj); 8 routed experts in 4 groups, each
    # token's top 3 within its best 2 groups (group_limited_greedy), scaled by 2, one shared expert.
    "deepseek_v2": FamilySpec(
        name="deepseek_v2",
        architecture="DeepseekV2ForCausalLM",
        model_type="deepseek_v2",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        layout="deepseek",
        size_overrides={"tiny": {"num_hidden_layers": 3}},
        extra_config={"q_lora_rank": 24, "mlp_bias": False, **DEEPSEEK_MOE, "n_routed_experts": 8,
                      "n_shared_experts": 1, "num_experts_per_tok": 3, "topk_method": "group_limited_greedy",
                      "n_group": 4, "topk_group": 2, "norm_topk_prob": False, "routed_scaling_factor": 2.0},
    ),
    # DeepSeek-V3's: low-rank queries, YaRN rope (factor 32 over 64 original positions) whose mscale_all_dim
    # multiplies the softmax scale; 8 routed experts by sigmoid with e_score_correction_bias (noaux_tc), top 2
    # within the best 2 of 4 groups, renormalised and scaled by 2.5, one shared expert.
    "deepseek_v3": FamilySpec(
        name="deepseek_v3",
        architecture="DeepseekV3ForCausalLM",
        model_type="deepseek_v3",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        layout="deepseek",
        size_overrides={"tiny": {"num_hidden_layers": 3}},
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
        extra_config={"q_lora_rank": 24, "rope_interleave": True, **DEEPSEEK_MOE, "n_routed_experts": 8,
                      "n_shared_experts": 1, "num_experts_per_tok": 2, "topk_method": "noaux_tc", "n_group": 4,
                      "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5},
    ),
    # Gemma 4 with its MoE block (enable_moe_block): the gemma4 checkpoint plus, in every layer, 5 routed experts of
    # 32 beside the dense MLP, top-2 renormalised and scaled per expert (layout gemma4).
    "gemma4_moe": dataclasses.replace(
        DENSE_FAMILIES["gemma4"],
        name="gemma4_moe",
        extra_config={"enable_moe_block": True, "num_experts": 5, "top_k_experts": 2, "moe_intermediate_size": 32},
    ),
}
