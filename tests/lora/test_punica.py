"""The grouped shrink/expand equals a per-row loop over each row's own adapter, projection by projection (base
rows untouched), whichever path a step takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.lora.punica import LoRABatchMapping, add_lora
from tests.lora.conftest import per_row_reference, random_stack

QKV = [0, 16, 20, 24]   # three projections of 16, 4 and 4 output rows (q/k/v of a grouped-query layer)


@pytest.mark.parametrize("slot_per_seq,query_lens,ranks,bounds,padded", [
    ([2, -1, 0, 2, 1, -1], [3, 1, 1, 4, 2, 5], [6, 0, 4, 5], QKV, False),   # uneven segments: one adapter at a time
    ([0, 2, 0, 2, 3, -1, 1], [1] * 7, [6, 0, 6, 6], QKV, True),           # a decode batch: all at once, slots 0-3
    ([3, 0, 3, 0, -1], [1] * 5, [5, 0, 0, 5], [0, 24], True),             # slots 0 and 3: not consecutive
    ([0, 2, 0, 2, 3, -1], [1] * 6, [6, 0, 4, 6], QKV, False),              # ranks differ: one adapter at a time
    ([1, 1], [3, 2], [0, 6], [0, 10, 24], False),                          # one adapter for every row: no gather
])
def test_grouped_ops_match_a_per_row_reference(slot_per_seq, query_lens, ranks, bounds, padded):
    gen = torch.Generator().manual_seed(1)
    stack = random_stack(ranks, bounds, d_in=16, max_rank=6)
    slot_per_seq, query_lens = np.array(slot_per_seq), np.array(query_lens)
    x = torch.randn(int(query_lens.sum()), 16, generator=gen)
    base = torch.randn(x.shape[0], bounds[-1], generator=gen)
    out = base.clone()
    mapping = LoRABatchMapping.build(slot_per_seq, query_lens, torch.device("cpu"))
    assert [slot for slot, _, _ in mapping.segments] == sorted(set(slot_per_seq.tolist()) - {-1})
    assert (mapping.padded_rows is not None and len(set(ranks[s] for s, _, _ in mapping.segments) - {0}) == 1) \
        == padded
    add_lora(out, x, stack, mapping)
    expected = per_row_reference(base, x, stack, np.repeat(slot_per_seq, query_lens))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_mappings_without_gathers():
    """No adapter rows: no segments (no work); one adapter for every row: no gather either."""
    cpu = torch.device("cpu")
    assert LoRABatchMapping.build(np.array([-1, -1]), np.array([2, 1]), cpu).segments == []
    one = LoRABatchMapping.build(np.array([4, 4]), np.array([2, 1]), cpu)
    assert one.segments == [(4, 0, 3)] and one.rows is None
