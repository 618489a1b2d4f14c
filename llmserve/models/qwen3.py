"""Qwen3: the Llama blocks with per-head RMSNorm on queries and keys before rotary; ``attention_bias``
(false in released checkpoints) on q/k/v and o, no MLP bias."""

from __future__ import annotations

from typing import Any

from llmserve.models.llama import LlamaBlockSpec, LlamaForCausalLM, hidden_act_of


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaBlockSpec(qkv_bias=bias, o_bias=bias, qk_norm=True, mlp_bias=False,
                              activation=hidden_act_of(config))
