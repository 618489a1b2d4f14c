"""Falcon (``FalconForCausalLM``): the shared decoder blocks with Falcon's choices, as transformers'
``modeling_falcon`` computes them.

- q/k/v fused in ``query_key_value``, grouped per KV head: the new decoder architecture
  (``new_decoder_architecture``, Falcon-40B/180B) stores ``[num_kv_heads, heads / num_kv_heads + 2, head_dim]``
  (each KV head's query heads, then its key and value); the older one is multi-query (``multi_query``,
  Falcon-7B: one KV head, ``[heads + 2, head_dim]``) or multi-head (``[heads, 3, head_dim]``). All are
  restacked on load, so tensor parallelism takes each rank's heads as for Llama;
- parallel attention and MLP (``parallel_attn``, always in the new architecture): both read the layer's input,
  normed by ``ln_attn`` and ``ln_mlp`` (``num_ln_in_parallel_attn`` 2, the new architecture's default) or by one
  ``input_layernorm``; else sequential, as Llama, with ``post_attention_layernorm`` before the MLP;
- LayerNorm with bias; ``bias`` switches the biases of every projection; a plain MLP of ``ffn_hidden_size``
  with ``activation``;
- rotary positions, or ALiBi (``alibi``, Falcon-RW): transformers scales Falcon's biases with the scores
  (``(q.k + slope * key) / sqrt(head_dim)``) and takes its slopes in bfloat16, so the slopes here are
  ``bfloat16(slope) / sqrt(head_dim)``;
- tied LM head by default (``tie_word_embeddings``).

Refused, since transformers cannot run them either: the new architecture with ``parallel_attn`` false or a
``num_ln_in_parallel_attn`` other than 1 or 2, two parallel norms in the old architecture, and ``num_kv_heads``
other than the head count in the old multi-head layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmserve.layers.attention.alibi import alibi_slopes
from llmserve.models.llama import (LlamaAttention, LlamaBlockSpec, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                   LlamaModel, UnsupportedModelConfigError, head_dim_of, make_norm, norm_eps_of)
from llmserve.models.transformer_names import TransformerNames, grouped_qkv_to_stacked
from llmserve.quantization.base import QuantizationConfig

_NAMES = TransformerNames(
    top={"transformer.word_embeddings.": "model.embed_tokens.", "transformer.ln_f.": "model.norm."},
    block={"ln_attn.": "input_layernorm.", "ln_mlp.": "mlp_layernorm.", "input_layernorm.": "input_layernorm.",
           "post_attention_layernorm.": "post_attention_layernorm.",
           "self_attention.query_key_value.": "self_attn.qkv_proj.", "self_attention.dense.": "self_attn.o_proj.",
           "mlp.dense_h_to_4h.": "mlp.up_proj.", "mlp.dense_4h_to_h.": "mlp.down_proj."})
_FUSED_QKV = "self_attention.query_key_value."


def falcon_kv_heads(config: Any) -> int:
    """KV heads as transformers' Falcon attention has them: ``num_kv_heads`` in the new architecture and the
    multi-head layout, one for multi-query."""
    if getattr(config, "new_decoder_architecture", False) or not getattr(config, "multi_query", True):
        return getattr(config, "num_kv_heads", None) or config.num_attention_heads
    return 1


def parallel_norms(config: Any) -> int:
    """Norms of a parallel layer: ``num_ln_in_parallel_attn`` (2 when unset in the new architecture)."""
    count = getattr(config, "num_ln_in_parallel_attn", None)
    return count if count is not None else (2 if getattr(config, "new_decoder_architecture", False) else 1)


class FalconDecoderLayer(nn.Module):
    """Parallel (``x + attn(norm(x)) + mlp(norm'(x))``, ``norm'`` being ``mlp_layernorm`` where there are two
    norms, else the same one) or sequential (the Llama layer). The residual add stays folded into the next
    layer's norm, as in the Llama layer."""

    input_norm = LlamaDecoderLayer.input_norm

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        eps = norm_eps_of(config)
        self.self_attn = LlamaAttention(config, spec, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config, spec, quant_config, f"{prefix}.mlp")
        self.input_layernorm = make_norm(spec, config.hidden_size, eps)
        parallel = getattr(config, "new_decoder_architecture", False) or getattr(config, "parallel_attn", True)
        self.mlp_layernorm = (make_norm(spec, config.hidden_size, eps)
                              if parallel and parallel_norms(config) == 2 else None)
        self.post_attention_layernorm = None if parallel else make_norm(spec, config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: object, rotary_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self.input_norm(hidden, residual)
        attn = self.self_attn(positions, normed, attn_metadata, rotary_lengths)
        if self.post_attention_layernorm is not None:   # sequential
            hidden, residual = self.post_attention_layernorm(attn, residual)
            return self.mlp(hidden), residual
        mlp_input = normed if self.mlp_layernorm is None else self.mlp_layernorm(residual)
        return attn + self.mlp(mlp_input), residual


class FalconModel(LlamaModel):
    decoder_layer_cls = FalconDecoderLayer


class FalconForCausalLM(LlamaForCausalLM):
    checkpoint_names = _NAMES
    model_cls = FalconModel

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        bias = bool(getattr(config, "bias", False))
        slopes = None
        if getattr(config, "alibi", False):   # transformers' slopes: float32, then bfloat16, scaled with the scores
            rounded = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32).bfloat16()
            slopes = tuple(s * head_dim_of(config) ** -0.5 for s in rounded.tolist())
        return LlamaBlockSpec(qkv_bias=bias, o_bias=bias, mlp_bias=bias, norm="layer",
                              activation=getattr(config, "activation", None) or "gelu", gated_mlp=False,
                              rotary=slopes is None, alibi_slopes=slopes, num_kv_heads=falcon_kv_heads(config),
                              mlp_size=getattr(config, "ffn_hidden_size", None) or 4 * config.hidden_size)

    @classmethod
    def check_config(cls, config: Any) -> None:
        new = bool(getattr(config, "new_decoder_architecture", False))
        if new and not getattr(config, "parallel_attn", True):
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: new_decoder_architecture with parallel_attn=false is not supported (transformers "
                f"builds that layer without the norms its forward uses)")
        if not new and getattr(config, "parallel_attn", True) and parallel_norms(config) == 2:
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: num_ln_in_parallel_attn=2 needs new_decoder_architecture (transformers' older "
                f"layer has one input norm)")
        if new and parallel_norms(config) not in (1, 2):
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: num_ln_in_parallel_attn={parallel_norms(config)} is not supported: the new decoder "
                f"architecture has one or two norms per layer")
        kv_heads = getattr(config, "num_kv_heads", None)
        multi_head = not new and not getattr(config, "multi_query", True)
        if multi_head and kv_heads not in (None, config.num_attention_heads):
            raise UnsupportedModelConfigError(
                f"{cls.__name__}: num_kv_heads={kv_heads} with multi_query=false and the old decoder architecture "
                f"is not supported: that layout has one key and one value head per query head")

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        renamed, block = _NAMES.rename(name)
        if block == _FUSED_QKV:
            tensor = grouped_qkv_to_stacked(tensor, falcon_kv_heads(self.config), head_dim_of(self.config))
        return renamed, tensor
