"""The batched LoRA ops (named after Punica's): one shrink and one expand per adapter in the batch.

A step's flat batch mixes tokens of many adapters and of the base model. :class:`LoRABatchMapping` sorts
the adapter rows by slot once per step (every layer reuses it): ``rows`` lists their token indices slot by
slot, and each segment ``(slot, start, end)`` is one adapter's run of them. A layer's adapters live in a
:class:`LoRAStack`: the A of its fused projections (q/k/v, gate/up) stacked, so the shrink is one matmul
to ``S x rank`` columns, and each projection's B on that projection's own output rows, so the expand of
projection i multiplies only its ``rank`` columns of the shrunk rows into its slice of the output (no
block-diagonal zeros). :func:`add_lora` gathers the adapter rows once, runs per segment the shrink and
the per-projection expands over the contiguous slice, and scatter-adds every delta into the base output
at once; one adapter for every row gathers nothing and adds straight into the output. When the segments
are of similar lengths (a decode batch: padding them to the longest at most doubles the work) and their
adapters share this layer's rank, the adapters run together instead: the rows gathered into
``[adapters, longest, in]``, batched matmuls against the slots' A and B (a view of the stacked buffers when
the slots are consecutive) and one scatter-add, a fixed handful of ops per layer however many
adapters there are. Never a loop over rows; base-model rows are in no segment and cost nothing, and a step
without adapter rows has no segments at all. On a GPU with Triton the same segments run as one kernel
launch per op (:mod:`llmserve.lora.triton_ops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class LoRABatchMapping:
    """The step's adapter rows: ``rows`` (token indices grouped by slot; None: every token, one adapter) and
    the ``(slot, start, end)`` segment of each adapter in them."""

    segments: list[tuple[int, int, int]] = field(default_factory=list)
    rows: torch.Tensor | None = None
    num_tokens: int = 0
    _order: np.ndarray | None = None   # ``rows`` on the host, for padded_segments()
    _padded: PaddedSegments | None = None
    _padded_built: bool = False
    _device_segments: Any = None
    _cpu_step: Any = None
    _segment_table: np.ndarray | None = None

    @classmethod
    def build(cls, slot_per_seq: np.ndarray, query_lens: np.ndarray, device: torch.device) -> LoRABatchMapping:
        """``slot_per_seq``: each batch row's adapter slot (-1: the base model); ``query_lens``: its tokens."""
        if not (slot_per_seq >= 0).any():
            return cls()
        num_tokens = int(query_lens.sum())
        first = int(slot_per_seq[0])
        if (slot_per_seq == first).all():
            return cls([(first, 0, num_tokens)], None, num_tokens)
        token_slots = np.repeat(slot_per_seq, query_lens)
        adapter_rows = np.flatnonzero(token_slots >= 0)
        order = adapter_rows[np.argsort(token_slots[adapter_rows], kind="stable")]
        sorted_slots = token_slots[order]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_slots)) + 1])
        ends = np.concatenate([starts[1:], [len(order)]])
        segments = [(int(sorted_slots[s]), int(s), int(e)) for s, e in zip(starts, ends)]
        return cls(segments, torch.from_numpy(order).to(device), num_tokens, order)

    @classmethod
    def over_device_segments(cls, segments: Any, num_slots: int, num_tokens: int) -> LoRABatchMapping:
        """A mapping whose rows and segments live in device buffers only (a CUDA graph's static
        :class:`~llmserve.lora.triton_ops.Segments`): it stands for a segment per slot, of lengths the buffers
        hold, so only the Triton kernels can run it."""
        mapping = cls([(slot, 0, 0) for slot in range(num_slots)], None, num_tokens)
        mapping._device_segments = segments
        return mapping

    def host_rows(self) -> np.ndarray:
        """The adapter rows' token indices, grouped by slot, on the host."""
        return np.arange(self.num_tokens, dtype=np.int64) if self._order is None else self._order

    def padded_segments(self) -> PaddedSegments | None:
        """The segments padded to the longest, when there are several and that at most doubles the rows
        (built on first use, then shared: only the PyTorch path reads them)."""
        if not self._padded_built:
            self._padded_built = True
            if self._order is not None and len(self.segments) > 1:
                self._padded = PaddedSegments.build(self._order, self.segment_table(), self.rows.device)
        return self._padded

    def segment_table(self) -> np.ndarray:
        """The segments as int64 ``[segments, 3]`` rows of (slot, start, end) (built on first use, then shared)."""
        if self._segment_table is None:
            self._segment_table = np.asarray(self.segments, dtype=np.int64).reshape(-1, 3)
        return self._segment_table

    def cpu_step(self) -> Any:
        """The segments as :class:`~llmserve.lora.cpu_ops.CPULoRAStep` (built on first use, then shared)."""
        if self._cpu_step is None:
            from llmserve.lora.cpu_ops import CPULoRAStep

            self._cpu_step = CPULoRAStep(self)
        return self._cpu_step

    def device_segments(self, device: torch.device) -> Any:
        """The segments as :class:`~llmserve.lora.triton_ops.Segments` (built on first use, then shared)."""
        if self._device_segments is None:
            from llmserve.lora.triton_ops import Segments

            self._device_segments = Segments.from_mapping(self, device)
        return self._device_segments


@dataclass
class PaddedSegments:
    """A step's segments padded to the longest: the token index of each of the ``[adapters x longest]``
    positions (padding: 0), which positions are padding, and the slots: a ``(first, end)`` range when
    consecutive, else their indices."""

    rows: torch.Tensor
    padding: torch.Tensor
    slot_range: tuple[int, int] | None
    slot_index: torch.Tensor | None

    @classmethod
    def build(cls, order: np.ndarray, table: np.ndarray, device: torch.device) -> PaddedSegments | None:
        """From the sorted adapter rows and the segment table; None when padding would more than double the
        rows."""
        slots, starts, ends = table[:, 0], table[:, 1], table[:, 2]
        lengths = ends - starts
        count, longest = len(table), int(lengths.max())
        if count * longest > 2 * len(order):
            return None
        padded = np.zeros((count, longest), dtype=np.int64)
        padding = np.ones((count, longest), dtype=bool)
        group = np.repeat(np.arange(count), lengths)
        position = np.arange(len(order)) - np.repeat(starts, lengths)
        padded[group, position] = order
        padding[group, position] = False
        consecutive = int(slots[-1] - slots[0]) == count - 1
        return cls(torch.from_numpy(padded.reshape(-1)).to(device), torch.from_numpy(padding.reshape(-1, 1)).to(device),
                   (int(slots[0]), int(slots[-1]) + 1) if consecutive else None,
                   None if consecutive else torch.from_numpy(slots.copy()).to(device))


@dataclass
class LoRAStack:
    """A layer's adapter slots. ``a`` [slots, S*R, in]: slot s holds projection i's A on rows
    ``[i * ranks[s], i * ranks[s] + rank_i)``; ``b`` [slots, out, R]: projection i's B on its output rows
    ``bounds[i]:bounds[i + 1]``, columns ``[0, rank_i)``. ``ranks[s]``: the largest rank of slot s's
    projections in this layer (0: the adapter leaves the layer alone). Past an adapter's ranks the
    buffers hold zeros, so a slot can be read at a larger rank."""

    a: torch.Tensor
    b: torch.Tensor
    bounds: list[int]
    ranks: list[int]

    @property
    def num_projections(self) -> int:
        return len(self.bounds) - 1


def new_stack(max_loras: int, max_rank: int, in_features: int, bounds: list[int], dtype: torch.dtype,
              device: torch.device) -> LoRAStack:
    """Empty (zero) slots for the projections ``bounds`` delimits. On the CPU, B is stored rank-major
    (``[slots, R, out]``, seen through a transposed view as ``[slots, out, R]``): the CPU kernel's expand adds
    each rank's row along contiguous output columns. Each rank's row is padded to an odd number of 64-byte
    cache lines, so the R rows a column tile of the expand reads fall in different cache sets (at a power of
    two, such as 4096 bfloat16 columns, they would all share one and evict each other). Elsewhere B is
    contiguous, as the Triton kernels read it."""
    projections, out_features = len(bounds) - 1, bounds[-1]
    a = torch.zeros(max_loras, projections * max_rank, in_features, dtype=dtype, device=device)
    if device.type == "cpu":
        per_line = 64 // torch.empty(0, dtype=dtype).element_size()
        lines = -(-out_features // per_line) | 1
        b = torch.zeros(max_loras, max_rank, lines * per_line, dtype=dtype, device=device)[..., :out_features]
        b = b.transpose(1, 2)
    else:
        b = torch.zeros(max_loras, out_features, max_rank, dtype=dtype, device=device)
    return LoRAStack(a, b, bounds, [0] * max_loras)


def add_lora(out: torch.Tensor, x: torch.Tensor, stack: LoRAStack, mapping: LoRABatchMapping) -> None:
    """``out[rows] += x[rows] A[slot]^T B[slot]^T`` (per projection) for each segment of ``mapping``, in
    place; ``x`` [tokens, in], ``out`` [tokens, out]."""
    ranks = [stack.ranks[slot] for slot, _, _ in mapping.segments]
    rank = max(ranks)
    if rank == 0:
        return   # no adapter of the step touches this layer
    if all(r in (0, rank) for r in ranks) and (padded := mapping.padded_segments()) is not None:
        return _add_lora_padded(out, x, stack, rank, padded)
    xs = x if mapping.rows is None else x.index_select(0, mapping.rows)
    if xs.dtype != stack.a.dtype:
        xs = xs.to(stack.a.dtype)
    if mapping.rows is None and out.dtype == stack.a.dtype:   # one adapter for every row: into out itself
        slot = mapping.segments[0][0]
        _expand(out, _shrink(xs, stack, slot, rank), stack, slot, rank, accumulate=True)
        return
    delta = torch.empty(xs.shape[0], out.shape[1], dtype=stack.a.dtype, device=x.device)
    for (slot, start, end), r in zip(mapping.segments, ranks):
        if r == 0:
            delta[start:end].zero_()
        else:
            _expand(delta[start:end], _shrink(xs[start:end], stack, slot, r), stack, slot, r, accumulate=False)
    if delta.dtype != out.dtype:
        delta = delta.to(out.dtype)
    if mapping.rows is None:
        out.add_(delta)
    else:
        out.index_add_(0, mapping.rows, delta)


def _shrink(xs: torch.Tensor, stack: LoRAStack, slot: int, rank: int) -> torch.Tensor:
    """``[rows, S*rank]``: every projection's shrink in one matmul."""
    return torch.mm(xs, stack.a[slot, :stack.num_projections * rank].t())


def _expand(dest: torch.Tensor, shrunk: torch.Tensor, stack: LoRAStack, slot: int, rank: int,
            accumulate: bool) -> None:
    """Each projection's ``rank`` columns of ``shrunk`` times its B, into its columns of ``dest`` (added to
    them with ``accumulate``, else written)."""
    bounds = stack.bounds
    for i in range(stack.num_projections):
        part, b = shrunk[:, i * rank:(i + 1) * rank], stack.b[slot, bounds[i]:bounds[i + 1], :rank].t()
        if accumulate:
            dest[:, bounds[i]:bounds[i + 1]].addmm_(part, b)
        else:
            torch.mm(part, b, out=dest[:, bounds[i]:bounds[i + 1]])


def _add_lora_padded(out: torch.Tensor, x: torch.Tensor, stack: LoRAStack, rank: int,
                     padded: PaddedSegments) -> None:
    """Every adapter at once over the padded segments: padding rows are zeroed, so their (zero) deltas
    can be added to row 0. Slots without this layer (rank 0) hold zeros."""
    count = len(padded.slot_index) if padded.slot_range is None else padded.slot_range[1] - padded.slot_range[0]
    xs = x.index_select(0, padded.rows).masked_fill_(padded.padding, 0.0)
    if xs.dtype != stack.a.dtype:
        xs = xs.to(stack.a.dtype)
    width = stack.num_projections * rank
    if padded.slot_range is not None:
        first, end = padded.slot_range
        a, b = stack.a[first:end, :width], stack.b[first:end, :, :rank]
    else:
        a = stack.a.index_select(0, padded.slot_index)[:, :width]
        b = stack.b.index_select(0, padded.slot_index)[..., :rank]
    shrunk = torch.bmm(xs.view(count, -1, xs.shape[1]), a.transpose(1, 2))
    bounds = stack.bounds
    delta = torch.empty(count, shrunk.shape[1], bounds[-1], dtype=shrunk.dtype, device=x.device)
    for i in range(stack.num_projections):
        torch.bmm(shrunk[..., i * rank:(i + 1) * rank], b[:, bounds[i]:bounds[i + 1]].transpose(1, 2),
                  out=delta[..., bounds[i]:bounds[i + 1]])
    delta = delta.view(-1, bounds[-1])
    if delta.dtype != out.dtype:
        delta = delta.to(out.dtype)
    out.index_add_(0, padded.rows, delta)
