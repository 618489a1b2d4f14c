"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention blocks (per-head q/k RMSNorm, ``attention_bias``)
with Qwen2-MoE's sparse layers (``decoder_sparse_step``, ``mlp_only_layers``) and router (``norm_topk_prob``),
without a shared expert."""

from __future__ import annotations

from typing import Any

from llmserve.models.llama import LlamaBlockSpec
from llmserve.models.qwen2_moe import Qwen2MoeForCausalLM
from llmserve.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    @classmethod
    def block_spec(cls, config: Any) -> LlamaBlockSpec:
        return Qwen3ForCausalLM.block_spec(config)
