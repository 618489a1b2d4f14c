"""Maps the ``architectures`` entry of a config.json to the class that implements it."""

from __future__ import annotations

from typing import Any

from torch import nn

from llmserve.models.bloom import BloomForCausalLM
from llmserve.models.cohere import Cohere2ForCausalLM, CohereForCausalLM
from llmserve.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from llmserve.models.falcon import FalconForCausalLM
from llmserve.models.gemma2 import Gemma2ForCausalLM
from llmserve.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from llmserve.models.gemma4 import Gemma4ForCausalLM, Gemma4ForConditionalGeneration
from llmserve.models.gpt2 import GPT2LMHeadModel
from llmserve.models.llama import LlamaForCausalLM
from llmserve.models.mistral import MistralForCausalLM
from llmserve.models.mixtral import MixtralForCausalLM
from llmserve.models.phi3 import Phi3ForCausalLM
from llmserve.models.qwen2 import Qwen2ForCausalLM
from llmserve.models.qwen2_moe import Qwen2MoeForCausalLM
from llmserve.models.qwen3 import Qwen3ForCausalLM
from llmserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "Gemma4ForCausalLM": Gemma4ForCausalLM,
    "Gemma4ForConditionalGeneration": Gemma4ForConditionalGeneration,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "CohereForCausalLM": CohereForCausalLM,
    "Cohere2ForCausalLM": Cohere2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
    "BloomForCausalLM": BloomForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}

# Multimodal checkpoints whose language model llmserve serves on its own (text in, text out).
TEXT_ONLY_ARCHITECTURES = ("Gemma3ForConditionalGeneration", "Gemma4ForConditionalGeneration")

# Known families llmserve does not run yet, and why (a clearer refusal than "unsupported architecture").
NOT_YET_SUPPORTED: dict[str, str] = {
    "Gemma3nForCausalLM": "Gemma 3n needs per-layer inputs, KV sharing and AltUp",
    "Gemma3nForConditionalGeneration": "Gemma 3n needs per-layer inputs, KV sharing and AltUp",
    "GemmaForCausalLM": "Gemma (1) is not implemented yet (Gemma 2, 3 and 4 are)",
}


class UnsupportedArchitectureError(ValueError):
    pass


def resolve_model_class(config: Any) -> type[nn.Module]:
    architectures = list(getattr(config, "architectures", None) or [])
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    known = [f"{arch} ({NOT_YET_SUPPORTED[arch]})" for arch in architectures if arch in NOT_YET_SUPPORTED]
    if known:
        raise UnsupportedArchitectureError(f"model architecture {', '.join(known)} is not supported yet; llmserve "
                                           f"supports: {', '.join(sorted(MODEL_REGISTRY))}")
    raise UnsupportedArchitectureError(
        f"unsupported model architecture {architectures or '(none in config.json)'}; "
        f"llmserve supports: {', '.join(sorted(MODEL_REGISTRY))}")


def text_model_config(config: Any) -> Any:
    """The config the model and the engine read: the config itself, or for a multimodal checkpoint served as
    text only (:data:`TEXT_ONLY_ARCHITECTURES`), its ``text_config`` with the checkpoint's architecture and,
    where the outer config sets them, its special token ids and dtype."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(arch in TEXT_ONLY_ARCHITECTURES for arch in architectures):
        return config
    text = config.get_text_config()
    text.architectures = architectures
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "dtype"):
        value = getattr(config, name, None)
        if value is not None:
            setattr(text, name, value)
    return text
