"""Mixtral: Mistral's attention blocks with every feed-forward block a sparse mixture of experts: a softmax
router picks ``num_experts_per_tok`` of ``num_local_experts`` experts per token and renormalises their weights;
no shared expert. Checkpoints name the block ``block_sparse_moe`` and an expert's gate, down and up projections
``w1``, ``w2`` and ``w3``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmserve.layers.fused_moe import MIXTRAL_EXPERT_NAMES, RoutingConfig
from llmserve.models.llama import LlamaBlockSpec, LlamaDecoderLayer, LlamaModel, hidden_act_of
from llmserve.models.moe import MoEForCausalLM, SparseMoeBlock
from llmserve.quantization.base import QuantizationConfig


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        routing = RoutingConfig(config.num_local_experts, config.num_experts_per_tok, renormalize=True)
        return SparseMoeBlock(config.hidden_size, routing, config.intermediate_size, spec.activation, quant_config,
                              prefix)


class MixtralModel(LlamaModel):
    decoder_layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(MoEForCausalLM):
    model_cls = MixtralModel
    expert_names = MIXTRAL_EXPERT_NAMES

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(activation=hidden_act_of(config))

    @classmethod
    def checkpoint_name(cls, name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        return self.checkpoint_name(name), tensor
