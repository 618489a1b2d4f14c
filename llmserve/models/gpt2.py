"""GPT-2 (``GPT2LMHeadModel``): the shared decoder blocks with GPT-2's choices.

- learned absolute position embeddings (``wpe``) added to the token embeddings, no rotary;
- LayerNorm with bias, biases on every projection, a plain (ungated) MLP with ``activation_function``
  (``gelu_new``: the tanh approximation);
- attention scale ``head_dim ** -0.5`` (1 with ``scale_attn_weights=false``), divided by ``layer + 1`` with
  ``scale_attn_by_inverse_layer_idx``; ``reorder_and_upcast_attn`` only changes HF's float16 path (attention
  scores here are float32 anyway);
- tied LM head.

Checkpoints store every projection as a ``Conv1D``: weight ``[in, out]`` (``y = x W + b``), the transpose of a
linear layer's, and q/k/v fused in ``c_attn``. :meth:`GPT2LMHeadModel.checkpoint_tensor` renames the tensors
onto the shared modules and transposes Conv1D weights, then the fused QKV linear splits ``c_attn`` into its
q/k/v shards and each linear takes this rank's rows or columns (tensor parallelism as for Llama). The names
map through :class:`~llmserve.models.transformer_names.TransformerNames`, as BLOOM's and Falcon's do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmserve.models.llama import (LlamaBlockSpec, LlamaForCausalLM, LlamaModel, UnsupportedModelConfigError)
from llmserve.models.transformer_names import TransformerNames
from llmserve.quantization.base import QuantizationConfig

# GPT-2 names -> the shared modules'; all four block projections are Conv1D.
_NAMES = TransformerNames(
    top={"transformer.wte.": "model.embed_tokens.", "transformer.wpe.": "model.embed_positions.",
         "transformer.ln_f.": "model.norm."},
    block={"ln_1.": "input_layernorm.", "ln_2.": "post_attention_layernorm.", "attn.c_attn.": "self_attn.qkv_proj.",
           "attn.c_proj.": "self_attn.o_proj.", "mlp.c_fc.": "mlp.up_proj.", "mlp.c_proj.": "mlp.down_proj."})
_CONV1D = ("attn.c_attn.", "attn.c_proj.", "mlp.c_fc.", "mlp.c_proj.")
# The causal-mask buffers older checkpoints saved with the weights.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT2Model(LlamaModel):
    """Token plus learned position embeddings in, LayerNorm blocks, final LayerNorm."""

    def __init__(self, config: Any, spec: LlamaBlockSpec, quant_config: QuantizationConfig | None = None,
                 prefix: str = "model") -> None:
        super().__init__(config, spec, quant_config, prefix)
        self.embed_positions = None
        if self.is_first_stage:   # small: every TP rank holds all of it
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.embed_positions.weight.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) + self.embed_positions(positions)


class GPT2LMHeadModel(LlamaForCausalLM):
    checkpoint_names = _NAMES
    model_cls = GPT2Model
    first_stage_prefixes = ("model.embed_tokens.", "model.embed_positions.")

    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(qkv_bias=True, o_bias=True, mlp_bias=True, norm="layer",
                              activation=config.activation_function, gated_mlp=False, rotary=False,
                              attn_scale=None if config.scale_attn_weights else 1.0,
                              attn_scale_by_inverse_layer=bool(config.scale_attn_by_inverse_layer_idx))

    @classmethod
    def check_config(cls, config: Any) -> None:
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedModelConfigError(
                "GPT2LMHeadModel with add_cross_attention=true (the decoder of an encoder-decoder model) is not "
                "supported: llmserve runs decoder-only models")

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if name.endswith(_MASK_BUFFERS):
            return None
        renamed, block = _NAMES.rename(name)   # checkpoints converted from OpenAI's have no transformer. prefix
        if block in _CONV1D and name.endswith(".weight"):
            tensor = tensor.t()
        return renamed, tensor
