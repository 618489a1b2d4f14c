"""The grouped shrink/expand equals a per-row loop over each row's own adapter (base rows untouched)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.lora.punica import LoRABatchMapping, add_lora


@pytest.mark.parametrize("slot_per_seq,query_lens,padded", [
    ([2, -1, 0, 2, 1, -1], [3, 1, 1, 4, 2, 5], False),     # uneven segments: one adapter at a time
    ([0, 2, 0, 2, 3, -1, 1], [1] * 7, True),              # a decode batch: all adapters at once, slots 0-3
    ([3, 0, 3, 0, -1], [1] * 5, True),                     # slots 0 and 3: not consecutive
])
def test_grouped_ops_match_a_per_row_reference(slot_per_seq, query_lens, padded):
    gen = torch.Generator().manual_seed(0)
    slots, rank, d_in, d_out = 4, 6, 16, 24
    lora_a = torch.randn(slots, rank, d_in, generator=gen)
    lora_b = torch.randn(slots, d_out, rank, generator=gen)
    ranks = [6, 0, 4, 5]                   # slot 1 holds an adapter with nothing in this layer
    for slot, r in enumerate(ranks):       # as the slots hold them: zeros past an adapter's rank
        lora_a[slot, r:] = 0
        lora_b[slot, :, r:] = 0
    slot_per_seq, query_lens = np.array(slot_per_seq), np.array(query_lens)
    x = torch.randn(int(query_lens.sum()), d_in, generator=gen)
    base = torch.randn(x.shape[0], d_out, generator=gen)
    out = base.clone()
    mapping = LoRABatchMapping.build(slot_per_seq, query_lens, torch.device("cpu"))
    assert [slot for slot, _, _ in mapping.segments] == sorted(set(slot_per_seq.tolist()) - {-1})
    assert (mapping.padded_rows is not None) == padded
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
