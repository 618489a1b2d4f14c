"""Checkpoints of the GPT-2-era families (GPT-2, BLOOM, Falcon) name their tensors ``transformer.<top>`` and
``transformer.h.N.<block>``, and BLOOM and Falcon fuse q/k/v per head group: this maps both onto the shared
modules of :mod:`llmserve.models.llama` (``model.*``, ``model.layers.N.*``, one ``qkv_proj`` stacked as
``[q; k; v]``), so those families load through the shared fused, tensor-parallel linears."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from llmserve.models.llama import CheckpointMismatchError

_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class TransformerNames:
    """A family's checkpoint names: ``top`` maps ``transformer.``-level prefixes, ``block`` the prefixes inside
    ``transformer.h.N.``, each onto the shared modules' names."""

    top: Mapping[str, str]
    block: Mapping[str, str]

    def rename(self, name: str) -> tuple[str, str | None]:
        """``(the shared name, the block prefix it matched)``. Checkpoints saved from the bare model (the original
        GPT-2 and BLOOM files) have no ``transformer.`` prefix: it is added. A top-level tensor, or one the family
        does not know (kept as is, so the loader reports it as unexpected), matches no block prefix: None."""
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        block = _BLOCK.match(name)
        if block is None:
            for old, new in self.top.items():
                if name.startswith(old):
                    return new + name[len(old):], None
            return name, None
        index, rest = block.groups()
        for old, new in self.block.items():
            if rest.startswith(old):
                return f"model.layers.{index}.{new}{rest[len(old):]}", old
        return f"model.layers.{index}.{rest}", None


def grouped_qkv_to_stacked(tensor: torch.Tensor, num_groups: int, head_dim: int) -> torch.Tensor:
    """A fused ``query_key_value`` weight ``[rows, hidden]`` or bias ``[rows]`` whose rows come in
    ``num_groups`` groups of ``[the group's query heads..., its key head, its value head]``, restacked as
    ``[all query heads; all key heads; all value heads]`` (the layout the fused QKV linear splits).

    Falcon's new decoder architecture groups per KV head; BLOOM and Falcon's older multi-head layout
    (``[heads, 3, head_dim]``) are groups of one query head; Falcon's multi-query layout (``[heads + 2,
    head_dim]``) is a single group."""
    rest = tensor.shape[1:]
    if tensor.shape[0] % (num_groups * head_dim) or tensor.shape[0] < 3 * num_groups * head_dim:
        raise CheckpointMismatchError(f"a fused query_key_value of {tensor.shape[0]} rows does not hold {num_groups} "
                                      f"groups of query, key and value heads of {head_dim}")
    grouped = tensor.reshape(num_groups, -1, head_dim, *rest)
    parts = (grouped[:, :-2], grouped[:, -2], grouped[:, -1])
    return torch.cat([part.reshape(-1, *rest) for part in parts])
