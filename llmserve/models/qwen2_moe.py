"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention blocks (q/k/v bias, ``qkv_bias``) whose feed-forward
blocks are sparse where transformers makes them so (every ``decoder_sparse_step``-th layer outside
``mlp_only_layers``; the others keep a dense MLP of ``intermediate_size``). A sparse block: a softmax router over
``num_experts`` experts of ``moe_intermediate_size`` (weights renormalised with ``norm_topk_prob``), plus a shared
expert of ``shared_expert_intermediate_size`` that every token goes through, scaled by
``sigmoid(shared_expert_gate(x))``."""

from __future__ import annotations

from typing import Any

from torch import nn

from llmserve.layers.fused_moe import RoutingConfig
from llmserve.models.llama import LlamaBlockSpec, LlamaDecoderLayer, LlamaMLP, LlamaModel, hidden_act_of, layer_index
from llmserve.models.moe import MoEForCausalLM, SparseMoeBlock, shared_expert_mlp
from llmserve.quantization.base import QuantizationConfig


def is_sparse_layer(config: Any, layer: int) -> bool:
    """Whether decoder layer ``layer`` has the sparse block (transformers' rule for Qwen2- and Qwen3-MoE)."""
    return (layer not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        if not is_sparse_layer(config, layer_index(prefix)):
            return LlamaMLP(config, spec, quant_config, prefix)
        routing = RoutingConfig(config.num_experts, config.num_experts_per_tok,
                                renormalize=bool(getattr(config, "norm_topk_prob", False)))
        shared_size = getattr(config, "shared_expert_intermediate_size", 0) or 0
        shared = shared_expert_mlp(config, spec, quant_config, prefix, shared_size)
        return SparseMoeBlock(config.hidden_size, routing, config.moe_intermediate_size, spec.activation,
                              quant_config, prefix, shared_expert=shared, gated_shared_expert=True)


class Qwen2MoeModel(LlamaModel):
    decoder_layer_cls = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(MoEForCausalLM):
    model_cls = Qwen2MoeModel

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(qkv_bias=bool(getattr(config, "qkv_bias", True)), activation=hidden_act_of(config))
