"""CUDA graphs for decode steps (as vLLM does): capture the model's forward once per batch size, replay it.

A decode step launches a few kernels per layer for very little work each, so on a GPU its time is mostly
launch overhead. :class:`DecodeGraphs` captures, for each size in :func:`capture_batch_sizes`, the forward
of a decode-only batch reading from static buffers (token ids, positions, rotary lengths, and the attention
backend's static metadata: block tables, lengths, slot mapping). A step of ``n`` decodes is padded to the smallest
captured size ``>= n``; the padded rows get slot -1 (their K/V are not stored) and length 0 (their
attention output is zero), and their hidden states are dropped.

A model with several KV-cache groups (:mod:`llmserve.worker.kv_cache_groups`) captures one set of static
block tables and slots per group (the lengths are shared); each replay writes every group's.

With LoRA on (and its Triton kernels), each size is captured twice: without adapters, so that steps with no
adapter rows replay exactly what they would with LoRA off, and with the adapter kernels reading static segment
buffers (:mod:`llmserve.lora.graph_inputs`) that each replay of an adapter step refills.

Captured graphs read block tables up to ``max_seq_len_to_capture`` tokens wide; steps with a longer
context, larger batches, prefill chunks, or ``enforce_eager`` run eagerly. Logits and sampling run
outside the graph (their shapes and work depend on the requests' sampling parameters).

The graphs share one memory pool, captured largest first so that smaller graphs reuse its blocks
(``torch.cuda.graph_pool_handle``). Sharing is safe here because every replay's output is consumed (the
LM head reads the rows it needs) before the next replay overwrites the pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, KVCacheGroupMetadata

if TYPE_CHECKING:
    from llmserve.lora.graph_inputs import LoRAGraphInputs

logger = logging.getLogger(__name__)

# Decode batches above this are not captured (vLLM's default largest capture size).
MAX_CAPTURE_BATCH_SIZE = 512


def capture_batch_sizes(max_num_seqs: int, limit: int = MAX_CAPTURE_BATCH_SIZE) -> list[int]:
    """vLLM's capture sizes: 1, 2, 4, then every 8 up to 256, then every 16, up to ``max_num_seqs``
    (capped at ``limit``); ``max_num_seqs`` itself is added so that every decode batch has a graph."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    top = min(max_num_seqs, limit)
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, limit + 1, 16))
    sizes = [s for s in sizes if s <= top]
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds ``num_seqs`` rows; None when the batch is too large."""
    for size in sizes:   # sorted ascending
        if size >= num_seqs:
            return size
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph   # anything with replay()
    metadata: object
    output: torch.Tensor   # [batch, hidden], in the shared pool: valid until the next replay


class DecodeGraphs:
    def __init__(self, model: nn.Module, backend: AttentionBackend, block_size: int, max_num_seqs: int,
                 max_seq_len_to_capture: int, device: torch.device, num_kv_cache_groups: int = 1,
                 lora_graph_inputs: Callable[[int], LoRAGraphInputs] | None = None) -> None:
        """``lora_graph_inputs(largest size)``: the LoRA manager's static segments, to capture adapter steps too."""
        if not getattr(backend, "supports_cuda_graphs", False):
            raise ValueError(f"the {backend.name} attention backend cannot be captured in a CUDA graph")
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.num_kv_cache_groups = num_kv_cache_groups
        self.sizes = capture_batch_sizes(max_num_seqs)
        self.max_seq_len = max_seq_len_to_capture
        self.max_blocks = -(-max_seq_len_to_capture // block_size)
        largest = self.sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.rotary_lengths = torch.ones(largest, dtype=torch.long, device=device)
        self.graphs: dict[int, _Graph] = {}
        self.lora = None if lora_graph_inputs is None else lora_graph_inputs(largest)
        self.lora_graphs: dict[int, _Graph] = {}   # with the adapter kernels

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first; each is run once eagerly first (Triton compiles its kernels
        and cuBLAS picks its algorithms outside the capture)."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.record_all(lambda size, metadata: self._capture_one(size, metadata, pool))
        torch.cuda.synchronize(self.device)
        logger.info("Captured CUDA graphs for %d decode batch sizes (1..%d, contexts up to %d tokens%s) in %.1f s",
                    len(self.sizes), self.sizes[-1], self.max_seq_len,
                    "; each also with LoRA adapters" if self.lora is not None else "", time.perf_counter() - t0)

    def record_all(self, record: Callable[[int, object], _Graph]) -> None:
        """``record(size, static metadata)`` for every size, largest first; with LoRA once more per size, the
        layers reading the static segments. Both graphs of a size share its metadata buffers (one replays at a
        time, each after its refill)."""
        for size in reversed(self.sizes):
            metadata = self.static_metadata(size)
            if self.lora is None:
                self.graphs[size] = record(size, metadata)
            else:
                with self.lora.without_adapters():   # whatever step ran before the capture
                    self.graphs[size] = record(size, metadata)
                with self.lora.capturing(size):
                    self.lora_graphs[size] = record(size, metadata)

    def static_metadata(self, size: int) -> object:
        """The static metadata buffers the graph of ``size`` rows reads: one per KV-cache group, when several."""
        metadata = self.backend.graph_decode_metadata(size, self.max_blocks, self.max_seq_len, self.device)
        if self.num_kv_cache_groups == 1:
            return metadata
        return KVCacheGroupMetadata([metadata, *(self.backend.graph_metadata_for_group(metadata)
                                                 for _ in range(self.num_kv_cache_groups - 1))])

    def _capture_one(self, size: int, metadata: object, pool: object) -> _Graph:
        ids, pos, lengths = self.input_ids[:size], self.positions[:size], self.rotary_lengths[:size]
        # padding rows only: slot -1 and length 0, nothing is written
        self.model(ids, pos, metadata, rotary_lengths=lengths)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = self.model(ids, pos, metadata, rotary_lengths=lengths)
        return _Graph(graph, metadata, output)

    def can_run(self, layout: BatchLayout) -> bool:
        """Decode-only, no larger than the largest graph, every context within the captured width."""
        n = len(layout.query_lens)
        return (n > 0 and layout.num_decodes == n and n <= self.sizes[-1]
                and max(layout.context_lens) + 1 <= self.max_seq_len)

    def run(self, layouts: list[BatchLayout], input_ids: np.ndarray, positions: np.ndarray,
            rotary_lengths: np.ndarray, with_lora: bool = False) -> torch.Tensor:
        """Replay the graph for this step (``layouts``: one per KV-cache group, the same rows with the group's block
        tables and slots, the slots on the CPU; ``with_lora``: the step has adapter rows, and graphs were captured
        with LoRA); returns hidden [n, hidden]."""
        n = len(input_ids)
        size = padded_batch_size(n, self.sizes)
        if with_lora:
            if self.lora is None:
                raise RuntimeError("a step with LoRA adapter rows, but the decode graphs were captured without LoRA")
            entry = self.lora_graphs[size]
            self.lora.fill()
        else:
            entry = self.graphs[size]
        ids = np.zeros(size, dtype=np.int64)
        pos = np.zeros(size, dtype=np.int64)
        lengths = np.ones(size, dtype=np.int64)
        ids[:n] = input_ids
        pos[:n] = positions
        lengths[:n] = rotary_lengths
        self.input_ids[:size].copy_(torch.from_numpy(ids), non_blocking=True)
        self.positions[:size].copy_(torch.from_numpy(pos), non_blocking=True)
        self.rotary_lengths[:size].copy_(torch.from_numpy(lengths), non_blocking=True)
        if self.num_kv_cache_groups == 1:
            self.backend.fill_graph_decode_metadata(entry.metadata, layouts[0])
        else:
            self.backend.fill_graph_decode_metadata(entry.metadata[0], layouts[0])
            for static, layout in zip(entry.metadata[1:], layouts[1:]):
                self.backend.fill_graph_group_metadata(static, layout)
        entry.graph.replay()
        return entry.output[:n]
