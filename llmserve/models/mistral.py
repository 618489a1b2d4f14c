"""Mistral: the Llama architecture (sliding-window configs are capped to the window by the engine)."""

from llmserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
