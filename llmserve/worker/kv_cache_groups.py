"""Which attention layers share a block table: KV-cache groups (vLLM's hybrid KV-cache layout).

A model that mixes full and sliding-window layers (Gemma 2 alternates them, Gemma 3 has 5 local : 1 global,
Cohere2 3 : 1) cannot free anything through one shared block table: its full layers read every block. So
each kind of layer gets groups of its own, and each group has its own block table per sequence, from one
pool. For a block id handed to one group to cost memory in that group only, the groups are equally large
(the fewest layers of any kind; a kind's last group may be short) and the i-th layer of every group uses the
same cache tensor: a block id then holds the K/V of exactly one group, and a block costs ``group size``
layers' worth of memory instead of every layer's.

Groups need layers whose caches are interchangeable (the same heads, head size and cache dtype), each holding
its own K/V, and every layer of the model on this rank; otherwise (KV shared between layers, a draft model,
pipeline stages, caches of different shapes) there is one group, which slides only if every layer does
(the widest window).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, KVCacheGroupMetadata, widest_window
from llmserve.layers.attention.layer import Attention


@dataclass(frozen=True)
class KVCacheGroups:
    windows: list[int | None]   # per group: its layers' window (None: full attention)
    layers: list[list[int]]     # per group: its layers, as indices into the model's attention layers

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def group_size(self) -> int:
        """Cache tensors the groups share: layer i of every group uses tensor i."""
        return max(len(layers) for layers in self.layers)


def one_group(num_layers: int, windows: list[int | None]) -> KVCacheGroups:
    """Every layer in one group, sliding only within the window that covers all of ``windows``."""
    return KVCacheGroups([widest_window(windows)], [list(range(num_layers))])


def form_kv_cache_groups(windows: list[int | None]) -> KVCacheGroups:
    """Groups for layers with these windows (interchangeable caches): one group when every layer sees
    alike; else each kind's layers, in order, cut into groups of as many layers as the rarest kind has."""
    kinds: dict[int | None, list[int]] = {}
    for i, window in enumerate(windows):
        kinds.setdefault(window, []).append(i)
    if len(kinds) <= 1:
        return one_group(len(windows), windows)
    size = min(len(layers) for layers in kinds.values())
    groups = [(window, layers[i:i + size]) for window, layers in kinds.items() for i in range(0, len(layers), size)]
    return KVCacheGroups([window for window, _ in groups], [layers for _, layers in groups])


def kv_cache_groups_for(layers: list[Attention], every_layer: list[Attention], dtype: torch.dtype,
                        pipeline_stages: int) -> KVCacheGroups:
    """The groups of ``layers`` (those holding a cache, in order): one per kind when their caches are
    interchangeable, they are ``every_layer`` that reads the pool (no layer reads another's K/V, no draft
    model) and the model is not split into pipeline stages; else one, sliding only if every layer does."""
    shapes = {(a.num_kv_heads, a.head_dim, a.values_in_key_cache, a.kv_cache_dtype(dtype)) for a in layers}
    if len(every_layer) == len(layers) and len(shapes) == 1 and pipeline_stages == 1:
        return form_kv_cache_groups([a.spec.sliding_window for a in layers])
    return one_group(len(layers), [a.spec.sliding_window for a in every_layer])


def bind_kv_caches(layers: list[Attention], groups: KVCacheGroups, backend: AttentionBackend, num_blocks: int,
                   block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate the pool's cache tensors and bind them: the i-th layer of every group shares tensor i (with
    one group, each layer has its own), and each layer is told its group."""
    for i in range(groups.group_size):
        members = [(g, layers[group[i]]) for g, group in enumerate(groups.layers) if i < len(group)]
        caches = members[0][1].new_kv_cache(num_blocks, block_size, dtype, device)
        for g, attn in members:
            attn.kv_cache_group = g
            attn.bind_cache(backend, *caches)


def group_metadata(backend: AttentionBackend, layout: BatchLayout, block_tables: np.ndarray,
                   slot_mapping: np.ndarray, device: torch.device) -> object:
    """The backend's metadata for a step (``layout``: the first group's, its slots on ``device``); with several
    groups, one per group (``[groups, ...]`` arrays): built once, then each other group's only swaps in its block
    tables and slots (:meth:`~llmserve.layers.attention.backend.AttentionBackend.metadata_for_group`)."""
    metadata = backend.build_metadata(layout, device)
    if len(block_tables) == 1:
        return metadata
    return KVCacheGroupMetadata([metadata, *(
        backend.metadata_for_group(metadata, tables, torch.from_numpy(slots).to(device))
        for tables, slots in zip(block_tables[1:], slot_mapping[1:]))])
