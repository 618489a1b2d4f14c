"""Qwen2: the Llama blocks with a bias on the q/k/v projections (none on o_proj or the MLP)."""

from __future__ import annotations

from typing import Any

from llmserve.models.llama import LlamaBlockSpec, LlamaForCausalLM, hidden_act_of


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return LlamaBlockSpec(qkv_bias=True, o_bias=False, qk_norm=False, mlp_bias=False,
                              activation=hidden_act_of(config))
