"""BLOOM (``BloomForCausalLM``): the shared decoder blocks with BLOOM's choices, as transformers'
``modeling_bloom`` computes them.

- the token embeddings go through a LayerNorm (``word_embeddings_layernorm``) before the first layer;
- no positional encoding in the embeddings: ALiBi biases in every attention layer (``slope * key_position``
  added to the scaled scores; the slopes of :mod:`llmserve.layers.attention.alibi`);
- q/k/v fused in ``query_key_value`` per head (``[heads, 3, head_dim]``), restacked on load;
- LayerNorm with bias, biases on every projection, a plain MLP of 4 x hidden with BLOOM's tanh GELU;
- sequential residual; with ``apply_residual_connection_post_layernorm`` the residual stream carries the
  norms' outputs instead of their inputs;
- tied LM head (``tie_word_embeddings``, true in released checkpoints).

``pretraining_tp`` / ``slow_but_exact`` only change how transformers splits its matmuls (the same sums).
Checkpoints saved from ``BloomModel`` (the released ones) have no ``transformer.`` prefix; both load.
"""

from __future__ import annotations

from typing import Any

import torch

from llmserve.layers.attention.alibi import alibi_slopes
from llmserve.layers.layernorm import LayerNorm
from llmserve.models.llama import (LlamaBlockSpec, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, head_dim_of,
                                   norm_eps_of)
from llmserve.models.transformer_names import TransformerNames, grouped_qkv_to_stacked
from llmserve.quantization.base import QuantizationConfig

_NAMES = TransformerNames(
    top={"transformer.word_embeddings.": "model.embed_tokens.",
         "transformer.word_embeddings_layernorm.": "model.embed_layernorm.", "transformer.ln_f.": "model.norm."},
    block={"input_layernorm.": "input_layernorm.", "post_attention_layernorm.": "post_attention_layernorm.",
           "self_attention.query_key_value.": "self_attn.qkv_proj.", "self_attention.dense.": "self_attn.o_proj.",
           "mlp.dense_h_to_4h.": "mlp.up_proj.", "mlp.dense_4h_to_h.": "mlp.down_proj."})
_FUSED_QKV = "self_attention.query_key_value."


class BloomDecoderLayer(LlamaDecoderLayer):
    """The Llama layer (norm, attention, add, norm, MLP, add), or with
    ``apply_residual_connection_post_layernorm`` each add takes the norm's output as the residual."""

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__(config, spec, quant_config, prefix)
        self.residual_after_norm = bool(getattr(config, "apply_residual_connection_post_layernorm", False))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: object, rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.residual_after_norm:
            return super().forward(positions, hidden, residual, attn_metadata, rotary_lengths)
        normed = self.input_layernorm(hidden if residual is None else hidden + residual)
        attn = self.self_attn(positions, normed, attn_metadata, rotary_lengths)
        normed = self.post_attention_layernorm(normed + attn)
        return self.mlp(normed), normed


class BloomModel(LlamaModel):
    """Token embeddings, then their LayerNorm (first stage only), BLOOM layers, final LayerNorm."""

    decoder_layer_cls = BloomDecoderLayer

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "model") -> None:
        super().__init__(config, spec, quant_config, prefix)
        self.embed_layernorm = LayerNorm(config.hidden_size, norm_eps_of(config)) if self.is_first_stage else None

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_layernorm(self.embed_tokens(input_ids))


class BloomForCausalLM(LlamaForCausalLM):
    checkpoint_names = _NAMES
    model_cls = BloomModel
    first_stage_prefixes = ("model.embed_tokens.", "model.embed_layernorm.")

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(qkv_bias=True, o_bias=True, mlp_bias=True, norm="layer", activation="gelu_pytorch_tanh",
                              gated_mlp=False, rotary=False, mlp_size=4 * config.hidden_size,
                              alibi_slopes=tuple(alibi_slopes(config.num_attention_heads)))

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        renamed, block = _NAMES.rename(name)
        if block == _FUSED_QKV:
            tensor = grouped_qkv_to_stacked(tensor, self.config.num_attention_heads, head_dim_of(self.config))
        return renamed, tensor
