"""GGUF tensor names -> checkpoint names for the architectures whose map is written here rather than taken from
transformers' GGUF support (:mod:`gguf_deepseek`, :mod:`gguf_gemma4`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")


def checkpoint_names(tensor_names: Iterable[str], layer_names: Mapping[str, str],
                     global_names: Mapping[str, str]) -> dict[str, str]:
    """Each tensor the maps name: ``blk.N.<key>`` as ``model.layers.N.<layer_names[key]>``, any other by
    ``global_names``; the tensors neither names are left out."""
    names = {}
    for name in tensor_names:
        layer = _LAYER_TENSOR.match(name)
        if layer and layer[2] in layer_names:
            names[name] = f"model.layers.{layer[1]}.{layer_names[layer[2]]}"
        elif name in global_names:
            names[name] = global_names[name]
    return names
