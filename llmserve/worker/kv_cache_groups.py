"""Which attention layers share a block table: KV-cache groups (vLLM's hybrid KV-cache layout).

A model that mixes full and sliding-window layers (Gemma 2 alternates them, Gemma 3 has 5 local : 1 global,
Cohere2 3 : 1, Gemma 4 4 : 1) cannot free anything through one shared block table: its full layers read every
block. So each kind of layer gets groups of its own, and each group has its own block table per sequence, from
one pool. For a block id handed to one group to cost memory in that group only, the groups are equally large
(the fewest layers of any kind; a kind's last group may be short) and the i-th layer of every group uses the
same cache tensor: a block id then holds the K/V of exactly one group, and a block costs ``group size``
layers' worth of memory instead of every layer's.

The layers of a tensor need not have the same cache shape (Gemma 4's full layers have their own head size and
KV heads): the tensor is a byte buffer with one page per block as large as its largest member's, which each
member views with its own shape (:mod:`llmserve.worker.kv_cache_pages`). A layer that reads another layer's K/V
(Gemma 4's ``num_kv_shared_layers``) holds no cache and reads its source's group. A draft model's layers
(speculative decoding) are grouped with the target's, by their window, in the same pool.

Under pipeline parallelism the groups are formed from every stage's layers (their windows gathered over the
pipeline group), so that every rank reports the same groups to the one block manager; each rank binds only its
own layers, the i-th of every group sharing its tensor i (a group may have no layer on a stage).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.distributed.parallel_state import GroupCoordinator
from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, KVCacheGroupMetadata, widest_window
from llmserve.layers.attention.layer import Attention
from llmserve.worker.kv_cache_pages import SharedPage, layer_view


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


def one_group(num_layers: int, windows: list[int | None]) -> KVCacheGroups:
    """Every layer in one group, sliding only within the window that covers all of ``windows``."""
    return KVCacheGroups([widest_window(windows)], [list(range(num_layers))])


def form_kv_cache_groups(windows: list[int | None]) -> KVCacheGroups:
    """Groups for layers with these windows: one group when every layer sees
    alike; else each kind's layers, in order, cut into groups of as many layers as the rarest kind has."""
    kinds: dict[int | None, list[int]] = {}
    for i, window in enumerate(windows):
        kinds.setdefault(window, []).append(i)
    if len(kinds) <= 1:
        return one_group(len(windows), windows)
    size = min(len(layers) for layers in kinds.values())
    groups = [(window, layers[i:i + size]) for window, layers in kinds.items() for i in range(0, len(layers), size)]
    return KVCacheGroups([window for window, _ in groups], [layers for _, layers in groups])


def kv_cache_groups_for(layers: list[Attention], pipeline: GroupCoordinator) -> KVCacheGroups:
    """The groups of ``layers`` (those holding a cache in the pool, in order: the model's, then a draft model's)
    and of the other ``pipeline`` stages' (their windows gathered from them): one per kind of window."""
    stages = pipeline.all_gather_json([a.spec.sliding_window for a in layers])
    start = sum(len(windows) for windows in stages[:pipeline.rank])
    groups = form_kv_cache_groups([window for windows in stages for window in windows])
    return dataclasses.replace(groups, stage=range(start, start + len(layers)) if pipeline.world_size > 1 else None)


def shared_pages(layers: list[Attention], groups: KVCacheGroups, block_size: int, dtype: torch.dtype,
                 in_model_dtype: bool = False) -> list[SharedPage]:
    """The page of each cache tensor the groups share (tensor i: the i-th layer of every group); with one group,
    each layer has its own. ``in_model_dtype``: sized as if every cache held the model's dtype."""
    stage = groups.stage_groups()
    return [SharedPage.of([layers[group[i]] for group in stage if i < len(group)], block_size, dtype,
                          in_model_dtype) for i in range(groups.group_size)]


def bind_kv_caches(layers: list[Attention], groups: KVCacheGroups, backends: list[AttentionBackend],
                   num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Allocate the pool's cache tensors and bind each layer (with its backend: ``backends[i]`` for
    ``layers[i]``) to its view of its tensor, telling it its group. Returns the byte buffers, each once (what a
    block copy copies)."""
    buffers: list[torch.Tensor] = []
    stage = groups.stage_groups()
    for i, page in enumerate(shared_pages(layers, groups, block_size, dtype)):
        tensors = page.allocate(num_blocks, device)
        buffers += tensors
        for g, group in enumerate(stage):
            if i >= len(group):
                continue
            attn = layers[group[i]]
            key_cache = layer_view(tensors[0], attn, block_size, dtype)
            value_cache = key_cache if attn.values_in_key_cache else layer_view(tensors[1], attn, block_size, dtype)
            attn.kv_cache_group = g
            attn.bind_cache(backends[group[i]], key_cache, value_cache)
    return buffers


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
