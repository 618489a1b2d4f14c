"""The grouped shrink/expand equals a per-row loop over each row's own adapter, projection by projection (base
rows untouched), whichever path a step takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.lora.cpu_ops import add_lora_cpu, cpu_kernel_runs
from llmserve.lora.punica import LoRABatchMapping, LoRAStack, add_lora
from tests.lora.conftest import per_row_reference, random_stack

QKV = [0, 16, 20, 24]   # three projections of 16, 4 and 4 output rows (q/k/v of a grouped-query layer)


QKV_WIDE = [0, 128, 160, 200]   # a full column tile, a partial one, one with a tail past its last vector

CASES = [
    ([2, -1, 0, 2, 1, -1], [3, 1, 1, 4, 2, 5], [6, 0, 4, 5], QKV, 16, False),   # uneven segments: one adapter at a time
    ([0, 2, 0, 2, 3, -1, 1], [1] * 7, [6, 0, 6, 6], QKV, 16, True),           # a decode batch: all at once, slots 0-3
    ([3, 0, 3, 0, -1], [1] * 5, [5, 0, 0, 5], [0, 24], 16, True),             # slots 0 and 3: not consecutive
    ([0, 2, 0, 2, 3, -1], [1] * 6, [6, 0, 4, 6], QKV, 16, False),              # ranks differ: one adapter at a time
    ([1, 1], [3, 2], [0, 6], [0, 10, 24], 16, False),                          # one adapter for every row: no gather
    ([1, 0, -1, 1, 2], [9, 4, 2, 3, 5], [3, 8, 5], QKV_WIDE, 40, False),      # full register tiles and ragged edges
    ([0, 0, 0], [4, 3, 6], [7], QKV_WIDE, 40, False),                         # one adapter, 13 rows: a partial row tile
]


@pytest.mark.parametrize("slot_per_seq,query_lens,ranks,bounds,d_in,padded", CASES)
def test_grouped_ops_match_a_per_row_reference(slot_per_seq, query_lens, ranks, bounds, d_in, padded):
    gen = torch.Generator().manual_seed(1)
    stack = random_stack(ranks, bounds, d_in=d_in, max_rank=max(ranks))
    slot_per_seq, query_lens = np.array(slot_per_seq), np.array(query_lens)
    x = torch.randn(int(query_lens.sum()), d_in, generator=gen)
    base = torch.randn(x.shape[0], bounds[-1], generator=gen)
    out = base.clone()
    mapping = LoRABatchMapping.build(slot_per_seq, query_lens, torch.device("cpu"))
    assert [slot for slot, _, _ in mapping.segments] == sorted(set(slot_per_seq.tolist()) - {-1})
    assert (mapping.padded_rows is not None and len(set(ranks[s] for s, _, _ in mapping.segments) - {0}) == 1) \
        == padded
    add_lora(out, x, stack, mapping)
    expected = per_row_reference(base, x, stack, np.repeat(slot_per_seq, query_lens))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_kernel_runs(random_stack([1], [0, 1], 1, 1, rank_major_b=True)),
                    reason="the CPU kernels cannot be built here")
@pytest.mark.parametrize("act_dtype,slot_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("slot_per_seq,query_lens,ranks,bounds,d_in,padded", CASES)
def test_cpu_kernel_matches_a_per_row_reference(slot_per_seq, query_lens, ranks, bounds, d_in, padded, act_dtype,
                                                slot_dtype):
    """The compiled kernel, on B stored rank-major as a CPU layer stores it, over the same steps. In bfloat16
    it sums in float32 and rounds each output element once: within half a bfloat16 step of the exact sum."""
    gen = torch.Generator().manual_seed(1)
    stack = random_stack(ranks, bounds, d_in=d_in, max_rank=max(ranks), rank_major_b=True)
    stack = LoRAStack(stack.a.to(slot_dtype), stack.b.transpose(1, 2).to(slot_dtype).transpose(1, 2), stack.bounds,
                      stack.ranks)
    slot_per_seq, query_lens = np.array(slot_per_seq), np.array(query_lens)
    x = torch.randn(int(query_lens.sum()), d_in, generator=gen).to(act_dtype)
    base = torch.randn(x.shape[0], bounds[-1], generator=gen).to(act_dtype)
    out = base.clone()
    mapping = LoRABatchMapping.build(slot_per_seq, query_lens, torch.device("cpu"))
    add_lora_cpu(out, x, stack, torch.tensor(ranks), torch.tensor(bounds), mapping)
    expected = per_row_reference(base, x, stack, np.repeat(slot_per_seq, query_lens))
    rtol = 1e-5 if act_dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=1e-5)


def test_mappings_without_gathers():
    """No adapter rows: no segments (no work); one adapter for every row: no gather either."""
    cpu = torch.device("cpu")
    assert LoRABatchMapping.build(np.array([-1, -1]), np.array([2, 1]), cpu).segments == []
    one = LoRABatchMapping.build(np.array([4, 4]), np.array([2, 1]), cpu)
    assert one.segments == [(4, 0, 3)] and one.rows is None
