"""What a step's batch looks like to the PyTorch attention paths: prefill chunks and length-grouped decodes.

The pieces the rows' lengths decide (masks, which blocks each row reads, its padding) are built once per step
and sliding window and shared by every KV-cache group; each group then takes its own blocks from its block
tables (:meth:`TorchAttentionMetadata.for_group`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmserve.layers.attention.backend import BatchLayout, padded_block_tables

if TYPE_CHECKING:
    from llmserve.layers.attention.torch_backend import TorchAttentionBackend


@dataclass
class PrefillChunk:
    """A row with its own query tokens (any number) over its cached context."""

    query_start: int
    query_len: int
    context_len: int
    mask: torch.Tensor | None   # [query_len, seq_len - key_start] bool (True = attend); None: plain causal
    key_start: int = 0          # position of the first key gathered (a block boundary; > 0 only with a window)
    # The blocks holding keys key_start .. context_len + query_len - 1: None in the length-derived piece every
    # KV-cache group shares, set in each group's (:meth:`with_table`).
    block_table: torch.Tensor | None = None

    def with_table(self, table: np.ndarray, block_size: int, device: torch.device) -> PrefillChunk:
        """This chunk reading its keys from ``table`` (its row of a group's block tables)."""
        end = -(-(self.context_len + self.query_len) // block_size)
        blocks = torch.from_numpy(table[self.key_start // block_size:end]).to(device=device, dtype=torch.long)
        return dataclasses.replace(self, block_table=blocks)


@dataclass
class DecodeGroup:
    """Decodes of similar length attended in one padded call."""

    rows: torch.Tensor | None   # their indices among the step's decodes; None: all decodes, in order
    bias: torch.Tensor          # [B, 1, 1, max_blocks * block_size]: 0 or -inf (padding, outside the window)
    query_keys: torch.Tensor    # [B]: where each row's own token lies among its gathered keys (for ALiBi)
    row_ids: list[int]          # ``rows`` on the host
    first_block: list[int]      # each row's first block gathered (its window's)
    num_blocks: list[int]       # blocks each row gathers from there
    # [B, max_blocks]: None in the length-derived piece every KV-cache group shares, set in each group's.
    block_tables: torch.Tensor | None = None

    def with_tables(self, tables: np.ndarray, device: torch.device) -> DecodeGroup:
        """These rows gathering from ``tables`` (a group's block tables of the step's decodes), padded with 0."""
        padded = padded_block_tables([tables[row, first:first + count] for row, first, count
                                      in zip(self.row_ids, self.first_block, self.num_blocks)])
        return dataclasses.replace(self, block_tables=torch.from_numpy(padded).to(device=device, dtype=torch.long))


@dataclass
class TorchAttentionMetadata:
    """The step's batch; the decode groups and prefill chunks of each sliding window (None: full
    attention) are built on first use by :meth:`decodes_for` / :meth:`prefills_for` and cached.

    With several KV-cache groups each group has one (:meth:`for_group`): they share what the rows' lengths
    decide (masks, which blocks each row reads, its padding), built once per step for a window in ``shapes``,
    and each takes its own blocks from its block tables."""

    slot_mapping: torch.Tensor
    num_decodes: int
    layout: BatchLayout
    device: torch.device
    backend: TorchAttentionBackend
    max_seq_len: int
    shapes: dict[tuple[str, int | None], Any] = field(default_factory=dict)
    _decodes: dict[int | None, Any] = field(default_factory=dict)
    _prefills: dict[int | None, list[PrefillChunk]] = field(default_factory=dict)

    def window(self, sliding_window: int | None) -> int | None:
        """``sliding_window``, or None where it covers every sequence of the step (full attention)."""
        return sliding_window if sliding_window is not None and sliding_window < self.max_seq_len else None

    def for_group(self, block_tables: np.ndarray, slot_mapping: torch.Tensor) -> TorchAttentionMetadata:
        """The same step for a KV-cache group with these block tables and slots (on the device)."""
        layout = dataclasses.replace(self.layout, block_tables=block_tables, slot_mapping=slot_mapping)
        return TorchAttentionMetadata(slot_mapping, self.num_decodes, layout, self.device, self.backend,
                                      self.max_seq_len, self.shapes)

    def _shape(self, kind: str, window: int | None, build: Callable[[], Any]) -> Any:
        if (kind, window) not in self.shapes:
            self.shapes[kind, window] = build()
        return self.shapes[kind, window]

    def decodes_for(self, window: int | None) -> Any:
        """What ``_attend_decodes`` needs for this (normalised) window."""
        key = window if self.backend.decodes_depend_on_window else None
        if key not in self._decodes:
            shape = self._shape("decode", key, lambda: self.backend._decode_shape(self.layout, self.device, key))
            self._decodes[key] = self.backend._decode_tables(shape, self.layout, self.device)
        return self._decodes[key]

    def prefills_for(self, window: int | None) -> list[PrefillChunk]:
        if window not in self._prefills:
            layout, nd = self.layout, self.num_decodes
            shape = self._shape("prefill", window, lambda: self.backend._prefill_shape(layout, self.device, window))
            self._prefills[window] = [chunk.with_table(table, layout.block_size, self.device)
                                      for chunk, table in zip(shape, layout.block_tables[nd:])]
        return self._prefills[window]

    @property
    def decodes(self) -> Any:
        """Full attention's decode metadata."""
        return self.decodes_for(None)

    @property
    def prefills(self) -> list[PrefillChunk]:
        """Full attention's prefill chunks."""
        return self.prefills_for(None)


# Padding a decode row may carry in its group: this fraction of the group's longest context, or this many
# blocks, whichever is larger (short contexts are cheap to pad; each extra group costs a few kernel calls).
MAX_PADDING_FRACTION = 0.25
MIN_PADDING_BLOCKS = 8


def group_decodes_by_length(num_blocks: list[int]) -> list[list[int]]:
    """Partition decode rows (given as their context length in blocks) into groups whose padding to the
    group's longest row stays within ``MAX_PADDING_FRACTION`` (or ``MIN_PADDING_BLOCKS``). Rows are taken
    longest first, so a group is a run of similar lengths; the attention work of a step then stays within
    ~1.33x of the unpadded work however the lengths are spread, instead of growing with the longest row."""
    order = sorted(range(len(num_blocks)), key=lambda i: -num_blocks[i])
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        if not groups or longest - num_blocks[i] > max(MAX_PADDING_FRACTION * longest, MIN_PADDING_BLOCKS):
            groups.append([])
            longest = num_blocks[i]
        groups[-1].append(i)
    return groups


def window_start(position: int, window: int | None) -> int:
    """The first key position a query at ``position`` sees (transformers' ``sliding_window_overlay``:
    keys ``j`` with ``position - window < j <= position``)."""
    return 0 if window is None else max(0, position - window + 1)
