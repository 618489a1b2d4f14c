"""Mistral: the Llama blocks without any bias (sliding-window configs are capped to the window by the engine)."""

from __future__ import annotations

from typing import Any

from llmserve.models.llama import LlamaBlockSpec, LlamaForCausalLM, hidden_act_of


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(qkv_bias=False, o_bias=False, qk_norm=False, mlp_bias=False,
                              activation=hidden_act_of(config))
