"""What the generated checkpoints are: each family's architecture, tokenizer, chat template and config
choices (:data:`DENSE_FAMILIES`; the mixture-of-experts ones are in :mod:`.checkpoint_families_moe`), and the
sizes they come in (:data:`SIZES`). :mod:`llmserve.testing.checkpoints`
writes them; :mod:`llmserve.testing.checkpoint_layouts` names their tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .chat_templates import (CHATML_TEMPLATE, GEMMA_CHAT_TEMPLATE, LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE,
                             MISTRAL_CHAT_TEMPLATE, PHI3_CHAT_TEMPLATE)
from .tokenizer_files import BYTELEVEL, SENTENCEPIECE

# --------------------------------------------------------------------------------------------------
# Families and sizes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    head_dim: int | None = None   # None: the family's head_dim_factor x hidden / heads


@dataclass(frozen=True)
class FamilySpec:
    name: str
    architecture: str
    model_type: str
    tokenizer_kind: str
    chat_template: str
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # head_dim = head_dim_factor * hidden_size // num_attention_heads
    head_dim_factor: int = 1
    # Llama-3 rope scaling (original_max_position_embeddings = max_position_embeddings // 8).
    llama3_rope_scaling: bool = False
    # Any other rope scaling, written as ``rope_scaling`` and into ``rope_parameters`` (LongRoPE).
    rope_scaling: Mapping[str, Any] | None = None
    # Multiplies the init scale of o_proj and down_proj (the residual branches).  Tied families need the
    # layers to dominate the residual stream: otherwise the current token's own embedding, read back
    # through the tied output matrix, keeps winning and greedy decoding collapses into repeats.
    branch_gain: float = 1.0
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    # Tensor names and layout: "llama", "gemma", "cohere", "phi3", "gpt2", "bloom" or "falcon" (see
    # checkpoint_layouts), "gemma4" (checkpoint_layout_gemma4), "moe" (checkpoint_layout_moe) or "deepseek"
    # (checkpoint_layout_deepseek).
    layout: str = "llama"
    # Per size name: SizeSpec fields to replace and other config.json keys to set.
    size_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        vocab_size=2000,
    ),
    "bench": SizeSpec(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        max_position_embeddings=4096,
        vocab_size=32000,
    ),
    # Draft models for speculative decoding: the tokenizer (and vocabulary) of the size they draft for, a
    # fraction of its layers and width.
    "tiny-draft": SizeSpec(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=2048,
        vocab_size=2000,
    ),
    "bench-draft": SizeSpec(
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=4096,
        vocab_size=32000,
    ),
    # GPU benchmark shapes (bf16: about 2.5 GB and 16 GB of weights). Llama-3.2-1B: 16 layers, hidden 2048,
    # 32 heads / 8 KV heads of 64, intermediate 8192 (pair it with family llama3: tied embeddings).
    "1b": SizeSpec(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        max_position_embeddings=8192,
        vocab_size=128256,
    ),
    # Llama-3-8B: 32 layers, hidden 4096, 32 heads / 8 KV heads of 128, intermediate 14336 (family llama:
    # untied embeddings).
    "8b": SizeSpec(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        max_position_embeddings=8192,
        vocab_size=128256,
    ),
}

# LongRoPE factors (one per rotating pair of dims): near 1 for short contexts, growing with the wavelength for
# long ones, as in Phi-3's checkpoints.
PHI3_SHORT_FACTOR = (1.0, 1.01, 1.03, 1.06, 1.1, 1.15, 1.25, 1.4)
PHI3_LONG_FACTOR = (1.0, 1.3, 1.9, 2.8, 4.2, 6.3, 9.5, 14.0)

DENSE_FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(
        name="llama",
        architecture="LlamaForCausalLM",
        model_type="llama",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=LLAMA2_CHAT_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        extra_config={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    ),
    "llama3": FamilySpec(
        name="llama3",
        architecture="LlamaForCausalLM",
        model_type="llama",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        llama3_rope_scaling=True,
        branch_gain=4.0,
        extra_config={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    ),
    "mistral": FamilySpec(
        name="mistral",
        architecture="MistralForCausalLM",
        model_type="mistral",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=MISTRAL_CHAT_TEMPLATE,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        extra_config={"sliding_window": None},
    ),
    "qwen2": FamilySpec(
        name="qwen2",
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        extra_config={"use_sliding_window": False, "sliding_window": None},
    ),
    "qwen3": FamilySpec(
        name="qwen3",
        architecture="Qwen3ForCausalLM",
        model_type="qwen3",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qk_norm=True,
        head_dim_factor=2,
        extra_config={"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
    ),
    "gemma2": FamilySpec(
        name="gemma2",
        architecture="Gemma2ForCausalLM",
        model_type="gemma2",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=GEMMA_CHAT_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        branch_gain=8.0,
        layout="gemma",
        extra_config={"attention_bias": False, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 15.0},
        size_overrides={"tiny": {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                                 "head_dim": 16, "sliding_window": 10},
                        "bench-draft": {"sliding_window": 4096}},
    ),
    "gemma3": FamilySpec(
        name="gemma3",
        architecture="Gemma3ForCausalLM",
        model_type="gemma3_text",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=GEMMA_CHAT_TEMPLATE,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        qk_norm=True,
        branch_gain=8.0,
        layout="gemma",
        extra_config={"attention_bias": False, "attn_logit_softcapping": None, "final_logit_softcapping": None},
        size_overrides={"tiny": {"hidden_size": 48, "num_hidden_layers": 6, "num_attention_heads": 6,
                                 "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 10},
                        "bench-draft": {"sliding_window": 4096}},
    ),
    "gemma4": FamilySpec(
        name="gemma4",
        architecture="Gemma4ForCausalLM",
        model_type="gemma4_text",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=GEMMA_CHAT_TEMPLATE,
        rope_theta=1000000.0,   # the global layers' (proportional rotary); local layers use 10k
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        branch_gain=8.0,
        layout="gemma4",
        size_overrides={"tiny": {"hidden_size": 48, "num_hidden_layers": 6, "num_attention_heads": 6,
                                 "num_key_value_heads": 2, "head_dim": 16}},
    ),
    "cohere": FamilySpec(
        name="cohere",
        architecture="CohereForCausalLM",
        model_type="cohere",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,   # written as layer_norm_eps
        tie_word_embeddings=True,
        qk_norm=True,
        branch_gain=32.0,
        layout="cohere",
        extra_config={"attention_bias": False},
        size_overrides={"tiny": {"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
                                 "num_key_value_heads": 2}},
    ),
    "cohere2": FamilySpec(
        name="cohere2",
        architecture="Cohere2ForCausalLM",
        model_type="cohere2",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,   # written as layer_norm_eps
        tie_word_embeddings=True,
        branch_gain=16.0,
        layout="cohere",
        extra_config={"attention_bias": False},
        size_overrides={"tiny": {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 6,
                                 "num_key_value_heads": 2, "sliding_window": 10},
                        "bench-draft": {"sliding_window": 4096}},
    ),
    "phi3": FamilySpec(
        name="phi3",
        architecture="Phi3ForCausalLM",
        model_type="phi3",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=PHI3_CHAT_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        layout="phi3",
        extra_config={"resid_pdrop": 0.0, "embd_pdrop": 0.0},
        size_overrides={"tiny": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                                 "sliding_window": 10}},
    ),
    # Phi-3-mini-128k's LongRoPE, switching at 32 tokens (so that prompts cross it) with an attention factor of
    # sqrt(1 + ln(2048 / 32) / ln(32)); no window, so that keys rotated before the switch stay in view.
    "phi3_longrope": FamilySpec(
        name="phi3_longrope",
        architecture="Phi3ForCausalLM",
        model_type="phi3",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=PHI3_CHAT_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        layout="phi3",
        rope_scaling={"rope_type": "longrope", "short_factor": PHI3_SHORT_FACTOR, "long_factor": PHI3_LONG_FACTOR},
        extra_config={"resid_pdrop": 0.0, "embd_pdrop": 0.0},
        size_overrides={"tiny": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                                 "sliding_window": None, "original_max_position_embeddings": 32}},
    ),
    # Phi-4-mini's shape of options: LongRoPE over a partial rotary (0.75 of each 16-dim head: 6 factor pairs),
    # tied embeddings.
    "phi4_mini": FamilySpec(
        name="phi4_mini",
        architecture="Phi3ForCausalLM",
        model_type="phi3",
        tokenizer_kind=SENTENCEPIECE,
        chat_template=PHI3_CHAT_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        branch_gain=4.0,
        layout="phi3",
        rope_scaling={"rope_type": "longrope", "short_factor": PHI3_SHORT_FACTOR[:6],
                      "long_factor": PHI3_LONG_FACTOR[:6]},
        extra_config={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "partial_rotary_factor": 0.75},
        size_overrides={"tiny": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                                 "sliding_window": None, "original_max_position_embeddings": 32}},
    ),
    "gpt2": FamilySpec(
        name="gpt2",
        architecture="GPT2LMHeadModel",
        model_type="gpt2",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=0.0,   # no rotary
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        branch_gain=4.0,
        layout="gpt2",
        size_overrides={"tiny": {"intermediate_size": 160}},
    ),
    "bloom": FamilySpec(
        name="bloom",
        architecture="BloomForCausalLM",
        model_type="bloom",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=0.0,   # no rotary: ALiBi
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        branch_gain=4.0,
        layout="bloom",
        # 6 heads: ALiBi slopes for a head count that is not a power of two; the MLP is always 4 x hidden.
        size_overrides={"tiny": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6}},
    ),
    # Falcon-40B/180B's layout: new decoder architecture, 6 query heads in 2 KV groups (GQA ratio 3), ln_attn
    # and ln_mlp, rotary, no biases.
    "falcon": FamilySpec(
        name="falcon",
        architecture="FalconForCausalLM",
        model_type="falcon",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        branch_gain=4.0,
        layout="falcon",
        extra_config={"new_decoder_architecture": True, "parallel_attn": True, "bias": False, "alibi": False},
        size_overrides={"tiny": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                                 "intermediate_size": 160}},
    ),
    # Falcon-7B's layout: multi-query (one KV head), parallel attention and MLP under one norm, rotary; untied.
    "falcon_mqa": FamilySpec(
        name="falcon_mqa",
        architecture="FalconForCausalLM",
        model_type="falcon",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        branch_gain=2.0,
        layout="falcon",
        extra_config={"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True, "bias": False,
                      "alibi": False},
        size_overrides={"tiny": {"num_key_value_heads": 1}},
    ),
    # Falcon-RW's layout: ALiBi, multi-head, sequential attention then MLP, biases.
    "falcon_rw": FamilySpec(
        name="falcon_rw",
        architecture="FalconForCausalLM",
        model_type="falcon",
        tokenizer_kind=BYTELEVEL,
        chat_template=CHATML_TEMPLATE,
        rope_theta=10000.0,   # unused: ALiBi
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        branch_gain=4.0,
        layout="falcon",
        extra_config={"new_decoder_architecture": False, "multi_query": False, "parallel_attn": False, "bias": True,
                      "alibi": True},
        size_overrides={"tiny": {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6,
                                 "intermediate_size": 160}},
    ),
}
