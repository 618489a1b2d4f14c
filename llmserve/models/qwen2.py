"""Qwen2: Llama with a bias on the q/k/v projections (none on o_proj)."""

from llmserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias = False
