"""The grouped shrink/expand equals a per-row loop over each row's own adapter (base rows untouched)."""

from __future__ import annotations

import numpy as np
import torch

from llmserve.lora.punica import LoRABatchMapping, add_lora


def test_grouped_ops_match_a_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    slots, rank, d_in, d_out = 3, 6, 16, 24
    lora_a = torch.randn(slots, rank, d_in, generator=gen)
    lora_b = torch.randn(slots, d_out, rank, generator=gen)
    ranks = [6, 0, 4]                      # slot 1 holds an adapter with nothing in this layer
    slot_per_seq = np.array([2, -1, 0, 2, 1, -1])
    query_lens = np.array([3, 1, 1, 4, 2, 5])
    x = torch.randn(int(query_lens.sum()), d_in, generator=gen)
    base = torch.randn(x.shape[0], d_out, generator=gen)
    out = base.clone()
    mapping = LoRABatchMapping.build(slot_per_seq, query_lens, torch.device("cpu"))
    assert mapping.segments == [(0, 0, 1), (1, 1, 3), (2, 3, 10)]   # the adapter rows sorted by slot
    add_lora(out, x, lora_a, lora_b, ranks, mapping)
    expected = base.clone()
    for row, slot in enumerate(np.repeat(slot_per_seq, query_lens)):
        if slot >= 0 and ranks[slot]:
            r = ranks[slot]
            expected[row] += lora_b[slot, :, :r] @ (lora_a[slot, :r] @ x[row])
    torch.testing.assert_close(out, expected)


def test_mappings_without_gathers():
    """No adapter rows: no segments (no work); one adapter for every row: no gather either."""
    cpu = torch.device("cpu")
    assert LoRABatchMapping.build(np.array([-1, -1]), np.array([2, 1]), cpu).segments == []
    one = LoRABatchMapping.build(np.array([4, 4]), np.array([2, 1]), cpu)
    assert one.segments == [(4, 0, 3)] and one.rows is None
