"""The batched LoRA ops (named after Punica's): one shrink and one expand per adapter in the batch.

A step's flat batch mixes tokens of many adapters and of the base model. :class:`LoRABatchMapping` sorts
the adapter rows by slot once per step (every layer reuses it): ``rows`` lists their token indices slot by
slot, and each segment ``(slot, start, end)`` is one adapter's run of them. :func:`add_lora` then gathers
the adapter rows once, runs per segment ``x A^T`` (shrink to the rank) and ``(.) B^T`` (expand to the
output) as two matmuls over the contiguous slice, and scatter-adds every delta into the base output at
once. The loop is over adapters, never over rows; base-model rows are in no segment and cost nothing, a
step without adapter rows has no segments at all, and one adapter for every row gathers nothing. On a GPU
with Triton the same segments run as one kernel launch per op (:mod:`llmserve.lora.triton_ops`).
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
    _device_segments: Any = None

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
        return cls(segments, torch.from_numpy(order).to(device), num_tokens)

    def device_segments(self, device: torch.device) -> Any:
        """The segments as :class:`~llmserve.lora.triton_ops.Segments` (built on first use, then shared)."""
        if self._device_segments is None:
            from llmserve.lora.triton_ops import Segments

            self._device_segments = Segments(self, device)
        return self._device_segments


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: list[int],
             mapping: LoRABatchMapping) -> None:
    """``out[rows] += x[rows] A[slot]^T B[slot]^T`` for each segment of ``mapping``, in place.

    ``x`` [tokens, in], ``out`` [tokens, out]; ``lora_a`` [slots, R, in] and ``lora_b`` [slots, out, R] are
    the stacked buffers, of which slot s uses the first ``ranks[s]`` columns (0: nothing to add).
    """
    if not any(ranks[slot] for slot, _, _ in mapping.segments):
        return   # no adapter of the step touches this layer
    xs = x if mapping.rows is None else x.index_select(0, mapping.rows)
    if xs.dtype != lora_a.dtype:
        xs = xs.to(lora_a.dtype)
    delta = torch.empty(xs.shape[0], lora_b.shape[1], dtype=lora_a.dtype, device=x.device)
    for slot, start, end in mapping.segments:
        rank = ranks[slot]
        if rank == 0:
            delta[start:end].zero_()
            continue
        torch.mm(torch.mm(xs[start:end], lora_a[slot, :rank].t()), lora_b[slot, :, :rank].t(), out=delta[start:end])
    if delta.dtype != out.dtype:
        delta = delta.to(out.dtype)
    if mapping.rows is None:
        out.add_(delta)
    else:
        out.index_add_(0, mapping.rows, delta)
