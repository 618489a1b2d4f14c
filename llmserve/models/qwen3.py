"""Qwen3: Llama with per-head RMSNorm on queries and keys before rotary, and no q/k/v bias."""

from llmserve.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
