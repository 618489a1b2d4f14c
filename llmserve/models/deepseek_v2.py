"""DeepSeek-V2 and DeepSeek-V3 (``DeepseekV2ForCausalLM``, ``DeepseekV3ForCausalLM``), as transformers'
``modeling_deepseek_v2`` / ``modeling_deepseek_v3`` compute them: the Llama decoder layout (RMSNorm before
attention and MLP, SwiGLU MLPs, untied LM head) with multi-head latent attention.

- Attention (:class:`DeepseekMLAAttention`): queries from ``q_proj``, or with ``q_lora_rank`` set through the
  low-rank ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``; per head ``qk_nope_head_dim`` dims without position
  and ``qk_rope_head_dim`` rotated ones. ``kv_a_proj_with_mqa`` gives each token its latent (``kv_lora_rank``,
  normalised by ``kv_a_layernorm``) and one rotated key part shared by all heads; ``kv_b_proj`` expands the
  latent to per-head keys and values (``v_head_dim``). It runs absorbed over the latent, which is all the KV
  cache holds (:mod:`llmserve.layers.attention.mla`).
- Rotary on the rope dims only, over their interleaved pairs (DeepSeek's layout: V2 always, V3 with
  ``rope_interleave``, the default; else rotate-half). transformers' V3 writes the rotated pairs back
  de-interleaved: a permutation applied to queries and keys alike, which leaves every score unchanged.
- YaRN (``rope_type: yarn``) scales the rotary frequencies; with ``mscale_all_dim`` the softmax scale is
  multiplied by ``yarn_get_mscale(factor, mscale_all_dim) ** 2``.
- Layers from ``first_k_dense_replace`` on (every ``moe_layer_freq``-th, as DeepSeek's own code counts) are
  mixture-of-experts layers; the others dense MLPs of ``intermediate_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmserve.distributed.parallel_state import get_tp_group
from llmserve.layers.attention.mla import LatentUpProjection, MLAAttention
from llmserve.layers.fused_moe import RoutingConfig
from llmserve.layers.layernorm import RMSNorm
from llmserve.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    divide,
)
from llmserve.layers.rotary import RotaryEmbedding, rope_parameters, yarn_mscale
from llmserve.models.llama import (
    LlamaBlockSpec,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    UnsupportedModelConfigError,
    hidden_act_of,
    layer_index,
)
from llmserve.models.moe import MoEForCausalLM, SparseMoeBlock, shared_expert_mlp
from llmserve.quantization.base import QuantizationConfig

# transformers' (and DeepSeek's) q_a_layernorm and kv_a_layernorm keep RMSNorm's default epsilon.
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(config: Any) -> float:
    """``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times ``yarn_get_mscale(factor, mscale_all_dim) ** 2``
    under a scaled rope with ``mscale_all_dim`` (transformers' ``yarn_apply_mscale``)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    _, rope = rope_parameters(config)
    mscale_all_dim = rope.get("mscale_all_dim", 0)
    if rope.get("rope_type", "default") != "default" and mscale_all_dim:
        scale *= yarn_mscale(float(rope["factor"]), float(mscale_all_dim)) ** 2
    return scale


def is_moe_layer(config: Any, layer: int) -> bool:
    """Whether decoder layer ``layer`` is a mixture-of-experts layer (else a dense MLP)."""
    return (getattr(config, "n_routed_experts", None) is not None and layer >= (config.first_k_dense_replace or 0)
            and layer % (getattr(config, "moe_layer_freq", 1) or 1) == 0)


class DeepseekMLAAttention(nn.Module):
    def __init__(self, config: Any, rope_interleaved: bool, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        tp = get_tp_group()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.v_dim = config.kv_lora_rank, config.v_head_dim
        self.num_heads = divide(total_heads, tp.world_size, "num_attention_heads")   # this rank's
        qk_dim = self.nope_dim + self.rope_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, total_heads * qk_dim, False, quant_config=quant_config,
                                               prefix=f"{prefix}.q_proj")
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias, quant_config, f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, total_heads * qk_dim, False,
                                                 quant_config=quant_config, prefix=f"{prefix}.q_b_proj")
        # The latent is replicated on every rank (each rank's heads read all of it).
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope_dim, bias, quant_config,
                                                   f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(self.kv_lora_rank, self.num_heads, self.nope_dim, self.v_dim, tp.rank,
                                            tp.world_size)
        self.o_proj = RowParallelLinear(total_heads * self.v_dim, hidden, bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(self.rope_dim, config.max_position_embeddings, theta, scaling,
                                          interleaved=rope_interleaved)
        self.attn = MLAAttention(self.num_heads, self.kv_lora_rank, self.rope_dim, mla_softmax_scale(config))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: object,
                rotary_lengths: torch.Tensor | None = None) -> torch.Tensor:
        t = hidden.shape[0]
        q = (self.q_proj(hidden) if self.q_lora_rank is None
             else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden))))
        q_nope, q_pe = q.view(t, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.reshape(t, 1, self.rope_dim))
        query = torch.cat((self.kv_b_proj.absorb_query(q_nope), q_pe), dim=-1)
        out = self.attn(query, torch.cat((latent, k_pe.view(t, self.rope_dim)), dim=-1), attn_metadata)
        return self.o_proj(self.kv_b_proj.expand_output(out))


def routing_config(config: Any) -> RoutingConfig:
    """DeepSeek's router: V3 (``noaux_tc``) scores by sigmoid and picks within its best ``topk_group`` of
    ``n_group`` groups (a group scored by its best two experts after ``e_score_correction_bias``); V2 scores by
    softmax and groups only with ``topk_method: group_limited_greedy`` (a group scored by its best expert).
    ``norm_topk_prob`` renormalises the chosen weights (as DeepSeek's code and vLLM do; off in every released V2),
    and ``routed_scaling_factor`` multiplies them."""
    method = "noaux_tc" if config.model_type == "deepseek_v3" else (getattr(config, "topk_method", None) or "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise UnsupportedModelConfigError(f"DeepSeek: unknown topk_method {method!r}")
    grouped = method != "greedy"
    return RoutingConfig(num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                         scoring="sigmoid" if method == "noaux_tc" else "softmax",
                         renormalize=bool(getattr(config, "norm_topk_prob", False)),
                         num_expert_group=config.n_group if grouped else None,
                         topk_group=config.topk_group if grouped else None,
                         routed_scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0))


class DeepseekDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with latent attention, and a dense MLP or a mixture of experts by :func:`is_moe_layer`: routed
    experts plus ``n_shared_experts`` shared ones every token goes through (one MLP of ``n_shared_experts *
    moe_intermediate_size``)."""

    def make_attention(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None,
                       prefix: str) -> nn.Module:
        # V2 rotates interleaved pairs always, V3 unless rope_interleave is off.
        interleaved = config.model_type != "deepseek_v3" or bool(getattr(config, "rope_interleave", True))
        return DeepseekMLAAttention(config, interleaved, quant_config, prefix)

    def make_mlp(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        if not is_moe_layer(config, layer_index(prefix)):
            return LlamaMLP(config, spec, quant_config, prefix)
        routing = routing_config(config)
        shared_size = (getattr(config, "n_shared_experts", 0) or 0) * config.moe_intermediate_size
        shared = shared_expert_mlp(config, spec, quant_config, prefix, shared_size)
        return SparseMoeBlock(config.hidden_size, routing, config.moe_intermediate_size, spec.activation,
                              quant_config, prefix, shared_expert=shared, correction_bias=routing.scoring == "sigmoid")


class DeepseekModel(LlamaModel):
    decoder_layer_cls = DeepseekDecoderLayer


class DeepseekV2ForCausalLM(MoEForCausalLM):
    model_cls = DeepseekModel

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(mlp_bias=bool(getattr(config, "mlp_bias", False)), activation=hidden_act_of(config))

    @classmethod
    def check_config(cls, config: Any) -> None:
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        if kv_heads not in (None, heads):
            raise UnsupportedModelConfigError(f"{cls.__name__}: multi-head latent attention has no KV-head groups "
                                              f"(num_key_value_heads {kv_heads} != num_attention_heads {heads})")

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """DeepSeek's ``mlp.shared_experts`` is the sparse block's ``shared_expert``."""
        return name.replace(".mlp.shared_experts.", ".mlp.shared_expert."), tensor


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """V3 differs in its router (sigmoid scores, ``e_score_correction_bias``, ``noaux_tc``) and in storing the
    multi-token-prediction module as extra layers past ``num_hidden_layers``, which the model does not run."""

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= self.config.num_hidden_layers:
            return None
        return super().checkpoint_tensor(name, tensor)
