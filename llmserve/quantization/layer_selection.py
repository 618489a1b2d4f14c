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
    """Whether ``predicate`` holds for every checkpoint module of the layer; raises :class:`CheckpointFormatError`
    when it holds for only some of them. A fused layer is judged by its projections' names first (``v_proj`` is
    not a listing of ``qkv_proj`` because it occurs in the name); the fused name itself counts only when none of
    them is listed, for a family whose checkpoint stores the fused module (Phi-3's ``qkv_proj``)."""
    names = checkpoint_names(prefix)
    hits = [predicate(name) for name in names]
    if any(hits) and not all(hits):
        raise CheckpointFormatError(f"the quantisation config treats the projections fused in {prefix} "
                                    f"({', '.join(names)}) differently; llmserve runs them as one layer in one "
                                    f"format")
    return all(hits) or (names != [prefix] and predicate(prefix))


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
