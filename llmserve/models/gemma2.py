"""Gemma 2: the Llama blocks with Gemma's choices, as transformers' ``modeling_gemma2`` computes them.

- RMSNorm scales by ``1 + w`` (:class:`~llmserve.layers.layernorm.GemmaRMSNorm`);
- four norms per layer: the attention and MLP outputs are normed too (``post_attention_layernorm`` is the
  attention output's norm here, ``pre_feedforward_layernorm`` the MLP input's), before the residual add;
- the embedding is multiplied by ``sqrt(hidden_size)`` rounded to the embedding's dtype;
- GeGLU MLP (``hidden_activation``, tanh-approximated GELU);
- attention scale ``query_pre_attn_scalar ** -0.5``, scores soft-capped by ``attn_logit_softcapping``, and the
  final logits by ``final_logit_softcapping``;
- sliding-window attention on the layers ``layer_types`` marks ``sliding_attention`` (transformers' default:
  the even layers 0, 2, ...), full attention on the others;
- tied embeddings (``tie_word_embeddings``, true in released checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch

from llmserve.models.llama import (LlamaBlockSpec, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel,
                                   UnsupportedModelConfigError, hidden_act_of, make_norm, norm_eps_of)
from llmserve.quantization.base import QuantizationConfig


class Gemma2DecoderLayer(LlamaDecoderLayer):
    """Norms before and after both the attention and the MLP (the residual adds stay folded into the next
    pre-norm, as in the Llama layer)."""

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__(config, spec, quant_config, prefix)
        self.pre_feedforward_layernorm = make_norm(spec, config.hidden_size, norm_eps_of(config))
        self.post_feedforward_layernorm = make_norm(spec, config.hidden_size, norm_eps_of(config))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: object, rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_norm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, attn_metadata, rotary_lengths))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(LlamaModel):
    decoder_layer_cls = Gemma2DecoderLayer

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "model") -> None:
        super().__init__(config, spec, quant_config, prefix)
        # transformers multiplies by the normaliser in the embedding's dtype (sqrt(3072) is 55.5 in bfloat16).
        dtype = torch.get_default_dtype()   # the model's dtype while the loader builds it
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5).to(dtype))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaBlockSpec(qkv_bias=bias, o_bias=bias, norm="gemma_rms", activation=hidden_act_of(config),
                              attn_scale=float(config.query_pre_attn_scalar) ** -0.5,
                              attn_logit_softcap=getattr(config, "attn_logit_softcapping", None))

    @classmethod
    def check_config(cls, config: Any) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: use_bidirectional_attention=true (an encoder-style Gemma) is not supported; "
                f"llmserve runs causal decoders only")

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None) -> None:
        super().__init__(config, quant_config)
        self.final_logit_softcap = getattr(config, "final_logit_softcapping", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
