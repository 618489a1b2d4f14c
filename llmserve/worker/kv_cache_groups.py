"""Which attention layers share a block table: KV-cache groups (vLLM's hybrid KV-cache layout).

A model that mixes full and sliding-window layers (Gemma 2 alternates them, Gemma 3 has 5 local : 1 global,
Cohere2 3 : 1) cannot free anything through one shared block table: its full layers read every block. So
each kind of layer gets groups of its own, and each group has its own block table per sequence, from one
pool. For a block id handed to one group to cost memory in that group only, the groups are equally large
(the fewest layers of any kind; a kind's last group may be short) and the i-th layer of every group uses the
same cache tensor: a block id then holds the K/V of exactly one group, and a block costs ``group size``
layers' worth of memory instead of every layer's.

Groups need layers whose caches are interchangeable (the same heads, head size and cache dtype), each holding
its own K/V; otherwise (KV shared between layers, a draft model, caches of different shapes) there is one group,
which slides only if every layer does (the widest window).

Under pipeline parallelism the groups are formed from every stage's layers (gathered over the pipeline group), so
that every rank reports the same groups to the one block manager; each rank binds only its own layers, the i-th of
every group sharing its tensor i (a group may have no layer on a stage).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.distributed.parallel_state import GroupCoordinator
from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, KVCacheGroupMetadata, widest_window
from llmserve.layers.attention.layer import Attention


@dataclass(frozen=True)
class KVCacheGroups:
    windows: list[int | None]   # per group: its layers' window (None: full attention)
    layers: list[list[int]]     # per group: its layers, as indices into the model's attention layers (every stage's)
    stage: range | None = None  # the indices of this rank's layers (a pipeline stage's); None: every layer

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    def stage_groups(self) -> list[list[int]]:
        """Per group: its layers on this rank, as indices into the rank's own attention layers (maybe none)."""
        if self.stage is None:
            return self.layers
        return [[i - self.stage.start for i in group if i in self.stage] for group in self.layers]

    @property
    def group_size(self) -> int:
        """Cache tensors this rank's layers of the groups share: its i-th layer of every group uses tensor i."""
        return max(len(layers) for layers in self.stage_groups())

    def tensor_layers(self) -> list[int]:
        """Per cache tensor of this rank, the first layer using it (as an index into the rank's own layers)."""
        groups = self.stage_groups()
        return [next(group[i] for group in groups if i < len(group)) for i in range(self.group_size)]


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
                        pipeline: GroupCoordinator) -> KVCacheGroups:
    """The groups of ``layers`` (those holding a cache, in order) and of the other ``pipeline`` stages' (gathered
    from them): one per kind when their caches are interchangeable and they are ``every_layer`` that reads the
    pool (no layer reads another's K/V, no draft model); else one, sliding only if every layer does."""
    mine = ([(a.spec.sliding_window, (a.num_kv_heads, a.head_dim, a.values_in_key_cache, a.kv_cache_dtype(dtype)))
             for a in layers], [a.spec.sliding_window for a in every_layer])
    stages = pipeline.all_gather_object(mine)
    kinds = [kind for stage_layers, _ in stages for kind in stage_layers]
    windows = [window for _, stage_windows in stages for window in stage_windows]
    start = sum(len(stage_layers) for stage_layers, _ in stages[:pipeline.rank])
    if len(windows) == len(kinds) and len({shape for _, shape in kinds}) == 1:
        groups = form_kv_cache_groups([window for window, _ in kinds])
    else:
        groups = one_group(len(kinds), windows)
    return dataclasses.replace(groups, stage=range(start, start + len(layers)) if pipeline.world_size > 1 else None)


def bind_kv_caches(layers: list[Attention], groups: KVCacheGroups, backend: AttentionBackend, num_blocks: int,
                   block_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate the pool's cache tensors and bind them: the i-th layer of every group shares tensor i (with
    one group, each layer has its own), and each layer is told its group."""
    stage = groups.stage_groups()
    for i in range(groups.group_size):
        members = [(g, layers[group[i]]) for g, group in enumerate(stage) if i < len(group)]
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
