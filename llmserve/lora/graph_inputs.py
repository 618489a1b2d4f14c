"""Adapter steps in CUDA graphs: the static segment buffers the captured LoRA kernels read.

A decode graph captures kernel launches with their grids and pointers fixed, while a step's adapter rows
(which slots, how many rows each) change every step. The Triton kernels' grid depends only on the number of
segments and the longest one (:mod:`llmserve.lora.triton_ops`), so a graph of ``size`` rows is captured over
buffers with room for a segment per slot (``--max-loras``), each up to ``size`` rows long; each replay writes
its step's segments there (unused ones of length 0, whose programs do nothing) in one host-to-device copy.
The slots' weights and ranks already live in preallocated buffers updated in place, so a graph sees an
adapter loaded after its capture.

The decode graphs (:mod:`llmserve.worker.cuda_graphs`) capture each batch size twice when LoRA is on: once
with no adapter (steps without adapter rows replay exactly the LoRA-off graph) and once through these buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np
import torch

from llmserve.lora.punica import LoRABatchMapping
from llmserve.lora.triton_ops import Segments


class LoRAGraphInputs:
    """Static segments for ``max_loras`` slots and up to ``max_rows`` adapter rows, and the shared step state
    (:class:`~llmserve.lora.layers.LoRABatchState`) whose mapping the layers read."""

    def __init__(self, state: object, max_loras: int, max_rows: int, device: torch.device) -> None:
        self.state = state
        self.max_loras, self.max_rows = max_loras, max_rows
        # rows, then every slot's start, length and slot: one buffer, so a replay fills it in one copy
        self._device = torch.zeros(max_rows + 3 * max_loras, dtype=torch.long, device=device)
        self._fields = self._device[max_rows:].view(3, max_loras)

    def segments(self, size: int) -> Segments:
        """The buffers as the kernels of a graph of ``size`` rows read them."""
        starts, lengths, slots = self._fields
        return Segments(self._device[:self.max_rows], starts, lengths, slots, size)

    def capturing(self, size: int) -> AbstractContextManager[None]:
        """The layers read the static segments (as LoRA rows of every slot) while the graph of ``size`` rows is
        recorded."""
        return self._mapping(LoRABatchMapping.over_device_segments(self.segments(size), self.max_loras, size))

    def without_adapters(self) -> AbstractContextManager[None]:
        """No adapter rows while a graph without LoRA is recorded (whatever step ran before)."""
        return self._mapping(LoRABatchMapping())

    @contextmanager
    def _mapping(self, mapping: LoRABatchMapping) -> Iterator[None]:
        previous = self.state.mapping
        self.state.mapping = mapping
        try:
            yield
        finally:
            self.state.mapping = previous

    def fill(self) -> None:
        """Write the step's mapping (set by the LoRA manager) into the static buffers, before a replay."""
        mapping = self.state.mapping
        if len(mapping.segments) > self.max_loras or mapping.num_tokens > self.max_rows:
            raise ValueError(f"a step of {mapping.num_tokens} tokens in {len(mapping.segments)} adapter segments does "
                             f"not fit graphs captured for {self.max_rows} rows and {self.max_loras} slots")
        host = np.zeros(len(self._device), dtype=np.int64)
        rows = mapping.host_rows()
        host[:len(rows)] = rows
        table = mapping.segment_table()
        fields = host[self.max_rows:].reshape(3, self.max_loras)
        count = len(table)
        fields[0, :count], fields[1, :count], fields[2, :count] = table[:, 1], table[:, 2] - table[:, 1], table[:, 0]
        self._device.copy_(torch.from_numpy(host), non_blocking=True)
