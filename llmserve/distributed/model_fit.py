"""Whether a model can be split as ``-tp``/``-pp`` ask, judged from its config before any worker starts.

The layers check the same rules when they are built (in every worker, after the processes have started and
the collectives are up); checking the config first turns the usual bad splits (heads, layers) into one clear
line at start-up. What only some families shard (an MLP width) is left to their layers.
"""

from __future__ import annotations

from typing import Any

from llmserve.layers.linear import qkv_head_partition
from llmserve.models.interface import layer_range


def check_parallel_fit(hf_config: Any, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Raise ValueError naming the numbers when the attention heads do not split over ``tensor_parallel_size``
    ranks or the decoder layers over ``pipeline_parallel_size`` stages."""
    config = hf_config.get_text_config()   # a multimodal config nests the decoder's
    heads = _int(config, "num_attention_heads")
    if tensor_parallel_size > 1 and heads is not None:
        qkv_head_partition(heads, _int(config, "num_key_value_heads") or heads, tensor_parallel_size)
    layers = _int(config, "num_hidden_layers")
    if pipeline_parallel_size > 1 and layers is not None:
        layer_range(layers, 0, pipeline_parallel_size)


def _int(config: Any, name: str) -> int | None:
    """The config's one value of ``name``; None where it has none, or one per layer (transformers' heterogeneous
    configs, such as Gemma 4's, refuse a global read: its layers check their own heads)."""
    try:
        value = getattr(config, name, None)
    except RuntimeError:   # transformers' AmbiguousGlobalPerLayerAttributeError
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
