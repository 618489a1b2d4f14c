"""Maps the ``architectures`` entry of a config.json to the class that implements it."""

from __future__ import annotations

from typing import Any

from torch import nn

from llmserve.models.llama import LlamaForCausalLM
from llmserve.models.mistral import MistralForCausalLM
from llmserve.models.qwen2 import Qwen2ForCausalLM
from llmserve.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


class UnsupportedArchitectureError(ValueError):
    pass


def resolve_model_class(config: Any) -> type[nn.Module]:
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise UnsupportedArchitectureError(
        f"unsupported model architecture {architectures or '(none in config.json)'}; "
        f"llmserve supports: {', '.join(sorted(MODEL_REGISTRY))}")
