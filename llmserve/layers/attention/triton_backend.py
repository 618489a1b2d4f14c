"""Paged attention with Triton kernels: the GPU path (see :mod:`llmserve.layers.attention.triton_kernels`).

Per step, :meth:`TritonAttentionBackend.build_metadata` turns the :class:`BatchLayout` into a few small
int32 tensors (block tables, lengths, query offsets) with one host-to-device copy each; ``forward`` then
launches, per layer, the K/V store kernel, the split-K decode kernel + its reduce for the decode rows,
and the flash-attention prefill kernel for the prefill chunks.

For CUDA graphs the decode metadata can live in static buffers (:meth:`TritonAttentionBackend.
graph_decode_metadata`) that :meth:`TritonAttentionBackend.fill_graph_decode_metadata` rewrites in place
before each replay: a decode batch's kernel grid depends only on its (padded) size and split count.

A quantised cache (int8, float8) is read by the same kernels, converted as each tile is loaded.

A layer's sliding window, logit soft-cap and ALiBi slopes (:class:`AttentionSpec`) are kernel arguments, so
one metadata serves every layer (the slopes tensor is made once per layer, so a CUDA graph keeps reading it).
Decode programs split only the window, so a windowed layer may use fewer splits than the step's longest
context calls for: :meth:`TritonAttentionMetadata.splits_for` picks them once per
window per step (for a CUDA graph, once at capture: they are a function of the captured size and width,
and the window start is computed inside the kernel from the lengths, so no extra static input is needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from llmserve.layers.attention import triton_kernels as kernels
from llmserve.layers.attention.alibi import alibi_slopes_tensor
from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec, BatchLayout


@dataclass
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor               # [T] int64; < 0 = padding, not stored
    num_decodes: int
    decode_block_tables: torch.Tensor | None   # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor | None       # [num_decodes] int32, including the new token
    num_splits: int
    num_prefills: int
    prefill_block_tables: torch.Tensor | None  # [num_prefills, max_blocks] int32
    prefill_query_start: torch.Tensor | None   # [num_prefills] int32: first row of each chunk in the step
    prefill_query_lens: torch.Tensor | None
    prefill_context_lens: torch.Tensor | None
    max_prefill_query_len: int
    max_decode_seq_len: int = 0                # the longest decode (for a graph: the captured width)
    max_seq_len: int = 0                       # the longest row of the step (for a graph: the captured width)
    # Split choice for the decode kernel given the tokens a row attends (None: num_splits).
    choose_splits: Callable[[int], int] | None = None
    _window_splits: dict[int, int] = field(default_factory=dict)

    def window(self, sliding_window: int | None) -> int | None:
        """``sliding_window``, or None where it covers every row of the step (the kernels' plain variant)."""
        if sliding_window is not None and 0 < self.max_seq_len <= sliding_window:
            return None
        return sliding_window

    def splits_for(self, window: int | None) -> int:
        """Decode splits for a layer with this sliding window: ``num_splits`` unless the window is shorter
        than the longest decode, then what a context of the window's length calls for (no more)."""
        if window is None or window >= self.max_decode_seq_len or self.choose_splits is None:
            return self.num_splits
        if window not in self._window_splits:
            self._window_splits[window] = min(self.num_splits, self.choose_splits(window))
        return self._window_splits[window]


def _table_rows(tables: np.ndarray, num_blocks: list[int]) -> np.ndarray:
    """The rows' block tables cut to the widest row's block count (at least one column)."""
    return np.ascontiguousarray(tables[:, :max(max(num_blocks), 1)])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    supports_quantized_kv_cache = True

    def __init__(self, dtype: torch.dtype, num_kv_heads: int = 8) -> None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton attention backend supports float16, bfloat16 and float32, not {dtype}")
        self.dtype = dtype
        self._num_sms: dict[torch.device, int] = {}
        self.num_kv_heads = num_kv_heads   # (sequence, KV head) pairs per decode row: the split choice needs it

    def _splits(self, device: torch.device, num_seqs: int, max_seq_len: int) -> int:
        if device not in self._num_sms:
            self._num_sms[device] = _num_sms(device)
        return kernels.choose_num_splits(num_seqs, self.num_kv_heads, max_seq_len, self._num_sms[device])

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TritonAttentionMetadata:
        bs = layout.block_size
        nd = layout.num_decodes
        seq_lens = layout.seq_lens
        num_blocks = [-(-s // bs) for s in seq_lens]

        def to_device(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device, non_blocking=True)

        decode_tables = decode_lens = None
        num_splits = 1
        max_decode = 0
        if nd:
            decode_tables = to_device(_table_rows(layout.block_tables[:nd], num_blocks[:nd]))
            decode_lens = to_device(np.asarray(seq_lens[:nd], dtype=np.int32))
            max_decode = max(seq_lens[:nd])
            num_splits = self._splits(device, nd, max_decode)
        np_ = len(layout.query_lens) - nd
        prefill_tables = query_start = query_lens = context_lens = None
        max_q = 0
        if np_:
            q_lens = np.asarray(layout.query_lens[nd:], dtype=np.int32)
            starts = nd + np.concatenate(([0], np.cumsum(q_lens)[:-1])).astype(np.int32)
            prefill_tables = to_device(_table_rows(layout.block_tables[nd:], num_blocks[nd:]))
            query_start = to_device(starts.astype(np.int32))
            query_lens = to_device(q_lens)
            context_lens = to_device(np.asarray(layout.context_lens[nd:], dtype=np.int32))
            max_q = int(q_lens.max())
        slot_mapping = layout.slot_mapping.to(device=device, dtype=torch.int64)
        return TritonAttentionMetadata(slot_mapping, nd, decode_tables, decode_lens, num_splits, np_,
                                       prefill_tables, query_start, query_lens, context_lens, max_q, max_decode,
                                       max(seq_lens, default=0), self._split_chooser(device, nd) if nd else None)

    def metadata_for_group(self, metadata: TritonAttentionMetadata, block_tables: np.ndarray,
                           slot_mapping: torch.Tensor) -> TritonAttentionMetadata:
        """Lengths, query offsets and split choices (``_window_splits`` too: the same dict) are shared."""
        nd = metadata.num_decodes

        def rows(tables: torch.Tensor | None, part: np.ndarray) -> torch.Tensor | None:
            if tables is None:
                return None
            return torch.from_numpy(np.ascontiguousarray(part[:, :tables.shape[1]])).to(tables.device,
                                                                                        non_blocking=True)

        return dataclasses.replace(metadata, slot_mapping=slot_mapping.to(dtype=torch.int64),
                                   decode_block_tables=rows(metadata.decode_block_tables, block_tables[:nd]),
                                   prefill_block_tables=rows(metadata.prefill_block_tables, block_tables[nd:]))

    def _split_chooser(self, device: torch.device, num_seqs: int) -> Callable[[int], int]:
        return lambda length: self._splits(device, num_seqs, length)

    # --------------------------------------------------------------------------- CUDA-graph decode metadata
    def graph_decode_metadata(self, batch_size: int, max_blocks: int, max_seq_len: int,
                              device: torch.device) -> TritonAttentionMetadata:
        """Static metadata for a decode-only batch of ``batch_size`` rows whose contexts fit in
        ``max_blocks`` blocks (``max_seq_len`` tokens); the split count is fixed for the graph's life."""
        return TritonAttentionMetadata(
            slot_mapping=torch.full((batch_size,), -1, dtype=torch.int64, device=device),
            num_decodes=batch_size,
            decode_block_tables=torch.zeros(batch_size, max_blocks, dtype=torch.int32, device=device),
            decode_seq_lens=torch.zeros(batch_size, dtype=torch.int32, device=device),
            num_splits=self._splits(device, batch_size, max_seq_len),
            num_prefills=0, prefill_block_tables=None, prefill_query_start=None, prefill_query_lens=None,
            prefill_context_lens=None, max_prefill_query_len=0, max_decode_seq_len=max_seq_len,
            max_seq_len=max_seq_len, choose_splits=self._split_chooser(device, batch_size))

    def fill_graph_decode_metadata(self, static: TritonAttentionMetadata, layout: BatchLayout) -> None:
        """Copy a decode-only step into ``static`` (from :meth:`graph_decode_metadata`), in place.

        Rows past the step's batch are padding: slot -1 (nothing stored) and length 0 (zero output).
        """
        lens = self._graph_seq_lens(static, layout)
        static.decode_seq_lens.copy_(torch.from_numpy(lens), non_blocking=True)
        self._fill_graph_blocks(static, layout, lens)

    def graph_metadata_for_group(self, static: TritonAttentionMetadata) -> TritonAttentionMetadata:
        return dataclasses.replace(static, slot_mapping=torch.full_like(static.slot_mapping, -1),
                                   decode_block_tables=torch.zeros_like(static.decode_block_tables))

    def fill_graph_group_metadata(self, static: TritonAttentionMetadata, layout: BatchLayout) -> None:
        self._fill_graph_blocks(static, layout, self._graph_seq_lens(static, layout))

    @staticmethod
    def _graph_seq_lens(static: TritonAttentionMetadata, layout: BatchLayout) -> np.ndarray:
        """The step's lengths padded to the graph's rows (0 past the batch), once checked to fit the graph."""
        n = layout.num_decodes
        capacity, max_blocks = static.decode_block_tables.shape
        if n != len(layout.query_lens) or n > capacity:
            raise ValueError(f"a graph replay takes up to {capacity} decodes and nothing else")
        lens = np.zeros(capacity, dtype=np.int32)
        lens[:n] = np.asarray(layout.context_lens, dtype=np.int32) + 1
        if -(-int(lens.max(initial=0)) // layout.block_size) > max_blocks:
            raise ValueError(f"context of {int(lens.max())} tokens exceeds the captured {max_blocks} blocks")
        return lens

    @staticmethod
    def _fill_graph_blocks(static: TritonAttentionMetadata, layout: BatchLayout, lens: np.ndarray) -> None:
        n = layout.num_decodes
        capacity, max_blocks = static.decode_block_tables.shape
        used = -(-int(lens.max(initial=0)) // layout.block_size)
        tables = np.zeros((capacity, max_blocks), dtype=np.int32)
        tables[:n, :used] = layout.block_tables[:n, :used]
        slots = np.full(capacity, -1, dtype=np.int64)
        slots[:n] = layout.slot_mapping.cpu().numpy()
        static.decode_block_tables.copy_(torch.from_numpy(tables), non_blocking=True)
        static.slot_mapping.copy_(torch.from_numpy(slots), non_blocking=True)

    # --------------------------------------------------------------------------- forward
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: TritonAttentionMetadata,
                spec: AttentionSpec, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        kernels.store_kv(key, value, key_cache, value_cache, metadata.slot_mapping, kv_scales)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        nd = metadata.num_decodes
        window, soft_cap = metadata.window(spec.sliding_window), spec.logits_soft_cap
        slopes = alibi_slopes_tensor(spec, query.device)
        if nd:
            kernels.decode_attention(query[:nd], key_cache, value_cache, out[:nd], metadata.decode_block_tables,
                                     metadata.decode_seq_lens, metadata.splits_for(window), spec.scale,
                                     window=window, soft_cap=soft_cap, alibi_slopes=slopes, kv_scales=kv_scales)
        if metadata.num_prefills:
            kernels.prefill_attention(query, key_cache, value_cache, out, metadata.prefill_block_tables,
                                      metadata.prefill_query_start, metadata.prefill_query_lens,
                                      metadata.prefill_context_lens, metadata.max_prefill_query_len, spec.scale,
                                      window=window, soft_cap=soft_cap, alibi_slopes=slopes, kv_scales=kv_scales)
        return out
