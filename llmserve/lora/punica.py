"""The batched LoRA ops (named after Punica's): one shrink and one expand per adapter in the batch.

A step's flat batch mixes tokens of many adapters and of the base model. :class:`LoRABatchMapping` groups
the token rows by adapter slot once per step (every layer reuses it); :func:`add_lora` then runs, per
adapter present, ``x[rows] A^T`` (shrink to the rank) and ``(.) B^T`` (expand to the output) as two
matmuls over all of that adapter's rows, and adds the result into the base output. The loop is over
adapters, never over rows; base-model rows are in no group and cost nothing, and a step without adapter
rows has no groups at all. On a GPU with Triton the same groups run as one segmented kernel launch per op
(:mod:`llmserve.lora.triton_ops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class LoRABatchMapping:
    """The step's token rows by adapter slot: ``(slot, rows)``, ``rows`` None when every token uses it."""

    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    num_tokens: int = 0
    _segments: Any = None

    def segments(self, device: torch.device) -> Any:
        """The groups as :class:`~llmserve.lora.triton_ops.Segments` (built on first use, then shared)."""
        if self._segments is None:
            from llmserve.lora.triton_ops import Segments

            self._segments = Segments(self.groups, self.num_tokens, device)
        return self._segments

    @classmethod
    def build(cls, slot_per_seq: np.ndarray, query_lens: np.ndarray, device: torch.device) -> LoRABatchMapping:
        """``slot_per_seq``: each batch row's adapter slot (-1: the base model); ``query_lens``: its tokens."""
        active = np.unique(slot_per_seq[slot_per_seq >= 0])
        if len(active) == 0:
            return cls()
        num_tokens = int(query_lens.sum())
        if len(active) == 1 and (slot_per_seq >= 0).all():
            return cls([(int(active[0]), None)], num_tokens)
        token_slots = np.repeat(slot_per_seq, query_lens)
        return cls([(int(slot), torch.from_numpy(np.flatnonzero(token_slots == slot)).to(device))
                    for slot in active], num_tokens)


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: list[int],
             mapping: LoRABatchMapping) -> None:
    """``out[rows] += x[rows] A[slot]^T B[slot]^T`` for each group of ``mapping``, in place.

    ``x`` [tokens, in], ``out`` [tokens, out]; ``lora_a`` [slots, R, in] and ``lora_b`` [slots, out, R] are
    the stacked buffers, of which slot s uses the first ``ranks[s]`` columns (0: nothing to add).
    """
    for slot, rows in mapping.groups:
        rank = ranks[slot]
        if rank == 0:
            continue
        xs = x if rows is None else x.index_select(0, rows)
        if xs.dtype != lora_a.dtype:
            xs = xs.to(lora_a.dtype)
        delta = torch.mm(torch.mm(xs, lora_a[slot, :rank].t()), lora_b[slot, :, :rank].t())
        if delta.dtype != out.dtype:
            delta = delta.to(out.dtype)
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)
