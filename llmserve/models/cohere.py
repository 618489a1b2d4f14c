"""Command-R (``CohereForCausalLM``) and Command R7B / Command A (``Cohere2ForCausalLM``): the Llama blocks
with Cohere's choices, as transformers' ``modeling_cohere`` / ``modeling_cohere2`` compute them.

- LayerNorm without a bias (mean-subtracted, weight only);
- parallel residual: one norm per layer, whose output feeds both the attention and the MLP, and
  ``x + attn(norm(x)) + mlp(norm(x))`` goes on (no ``post_attention_layernorm``);
- rotary in the interleaved (GPT-J) layout: dims ``2i`` and ``2i + 1`` rotate together;
- logits multiplied by ``logit_scale``; tied embeddings;
- Command-R: optional q/k LayerNorm (``use_qk_norm``, Command R+), with a weight per head and dim
  (``[heads, head_dim]``, normalised over head_dim);
- Cohere2: no q/k norm; ``layer_types`` (``sliding_window_pattern`` 4 in older configs: 3 sliding : 1 full)
  pick sliding-window layers, which use rotary, and full-attention layers, which have no positional
  encoding at all (transformers applies rope only where the layer has a window).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.linear import check_shape, copy_checked
from llmserve.models.llama import (LlamaAttention, LlamaBlockSpec, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                   LlamaModel, hidden_act_of, make_norm, norm_eps_of)
from llmserve.quantization.base import QuantizationConfig


class HeadLayerNorm(nn.Module):
    """Cohere's q/k norm: LayerNorm without bias over head_dim, with its own weight for every head. Holds this
    tensor-parallel rank's heads (``first_head`` onwards of the checkpoint's ``total_heads``)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, total_heads: int, first_head: int) -> None:
        super().__init__()
        self.eps, self.total_heads, self.first_head = eps, total_heads, first_head
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim), requires_grad=False)
        self.weight.weight_loader = self._load_heads

    def _load_heads(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        name = getattr(param, "checkpoint_name", "")
        check_shape(loaded, (self.total_heads, param.shape[1]), name)
        copy_checked(param, loaded.narrow(0, self.first_head, param.shape[0]), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [T, heads, head_dim]."""
        out = F.layer_norm(x.float(), x.shape[-1:], None, None, self.eps) * self.weight.float()
        return out.to(x.dtype)


class CohereAttention(LlamaAttention):
    """Llama attention whose q/k norms (where ``spec.qk_norm``) are :class:`HeadLayerNorm`."""

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__(config, dataclasses.replace(spec, qk_norm=False), quant_config, prefix)
        if spec.qk_norm:
            qkv, eps = self.qkv_proj, norm_eps_of(config)
            self.q_norm = HeadLayerNorm(qkv.num_heads, self.head_dim, eps, qkv.total_num_heads,
                                        qkv.tp_rank * qkv.num_heads)
            self.k_norm = HeadLayerNorm(qkv.num_kv_heads, self.head_dim, eps, qkv.total_num_kv_heads,
                                        (qkv.tp_rank // qkv.num_kv_head_replicas) * qkv.num_kv_heads)


class CohereDecoderLayer(nn.Module):
    """Parallel residual: attention and MLP both read ``input_layernorm(x)``; their sum is added to ``x``
    (the add itself stays folded into the next layer's norm, as in the Llama layer)."""

    input_norm = LlamaDecoderLayer.input_norm

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.self_attn = CohereAttention(config, spec, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, spec, quant_config, f"{prefix}.mlp")
        self.input_layernorm = make_norm(spec, config.hidden_size, norm_eps_of(config))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: object, rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self.input_norm(hidden, residual)
        return self.self_attn(positions, normed, attn_metadata, rotary_lengths) + self.mlp(normed), residual


class CohereModel(LlamaModel):
    decoder_layer_cls = CohereDecoderLayer


class CohereForCausalLM(LlamaForCausalLM):
    model_cls = CohereModel

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaBlockSpec(qkv_bias=bias, o_bias=bias, norm="layer_no_bias", activation=hidden_act_of(config),
                              rotary_interleaved=True, qk_norm=bool(getattr(config, "use_qk_norm", False)))

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(config, quant_config)
        self.logit_scale = float(getattr(config, "logit_scale", 1.0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.logit_scale


class Cohere2ForCausalLM(CohereForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return dataclasses.replace(super().block_spec(config), qk_norm=False, rotary_on_sliding_layers_only=True)
