"""Which layers a checkpoint's quantisation config covers, by the names the checkpoint uses.

Configs name checkpoint modules (``model.layers.0.self_attn.q_proj``, ``lm_head``), while llmserve fuses
q/k/v and gate/up into one layer; a fused layer is covered when every projection in it is, and a config
that splits a fused layer (quantises ``q_proj`` but not ``k_proj``) is refused: one layer has one format.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from llmserve.quantization.checkpoint_params import CheckpointFormatError

FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_names(prefix: str) -> list[str]:
    """The checkpoint module names a layer's ``prefix`` stands for."""
    parent, _, leaf = prefix.rpartition(".")
    parts = FUSED_PROJECTIONS.get(leaf)
    if parts is None:
        return [prefix]
    return [f"{parent}.{part}" if parent else part for part in parts]


def covers_all(prefix: str, predicate: Callable[[str], bool]) -> bool:
    """Whether ``predicate`` holds for every checkpoint module of the layer (or the fused name itself);
    raises :class:`CheckpointFormatError` when it holds for only some of them."""
    if predicate(prefix):
        return True
    hits = [predicate(name) for name in checkpoint_names(prefix)]
    if any(hits) and not all(hits):
        raise CheckpointFormatError(f"the quantisation config treats the projections fused in {prefix} "
                                    f"({', '.join(checkpoint_names(prefix))}) differently; llmserve runs them "
                                    f"as one layer in one format")
    return all(hits)


def contains_any(patterns: list[str] | None) -> Callable[[str], bool]:
    """transformers' ``modules_to_not_convert`` rule: a module is listed when a listed string occurs in its name."""
    return lambda name: any(p in name for p in patterns or ())


def matches_any(patterns: list[str] | None) -> Callable[[str], bool]:
    """compressed-tensors' rule for ``targets``/``ignore``: ``re:<regex>`` matched from the start of the name,
    otherwise the full name or its last components (``lm_head``, ``self_attn.q_proj``)."""
    def match(name: str) -> bool:
        for pattern in patterns or ():
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return True
            elif name == pattern or name.endswith("." + pattern):
                return True
        return False
    return match
