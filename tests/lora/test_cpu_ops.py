"""The CPU kernel's bindings: a layer bound once reads its slots as they are at each call, and the layers of one
step share the step's arguments and scratch whatever their widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.lora.cpu_ops import CPULoRALayer, cpu_kernel_runs
from llmserve.lora.punica import LoRABatchMapping, new_stack
from tests.lora.conftest import per_row_reference, random_stack

CPU = torch.device("cpu")
SLOT_PER_SEQ, QUERY_LENS = np.array([0, 2, -1, 1, 0, 2, 1]), np.array([1, 1, 1, 1, 3, 1, 2])


def filled_stack(ranks: list[int], bounds: list[int], d_in: int, seed: int):
    """A CPU layer's slots (as ``new_stack`` lays them out) holding random adapters of ``ranks``."""
    values = random_stack(ranks, bounds, d_in=d_in, max_rank=max(ranks), seed=seed)
    stack = new_stack(len(ranks), max(ranks), d_in, bounds, torch.float32, CPU)
    stack.a.copy_(values.a)
    stack.b.copy_(values.b)
    stack.ranks[:] = ranks
    return stack


@pytest.fixture(autouse=True)
def _kernel_built():
    if not cpu_kernel_runs(new_stack(1, 1, 1, [0, 1], torch.float32, CPU)):
        pytest.skip("the CPU kernels cannot be built here")


@pytest.mark.parametrize("widths_order", [(0, 1, 2), (2, 1, 0)])
def test_layers_of_one_step_share_its_scratch(widths_order):
    """Three layers of different shrunk widths (1, 3 and 2 projections at ranks up to 8) in one step, run narrow
    to wide and wide to narrow: each adds its own adapters' deltas, and the step builds its arguments once."""
    layers = [([0, 40], 24), ([0, 48, 56, 64], 32), ([0, 100, 164], 16)]
    ranks = [8, 4, 6]
    mapping = LoRABatchMapping.build(SLOT_PER_SEQ, QUERY_LENS, CPU)
    token_slots = np.repeat(SLOT_PER_SEQ, QUERY_LENS)
    gen = torch.Generator().manual_seed(3)
    for index in widths_order:
        bounds, d_in = layers[index]
        stack = filled_stack(ranks, bounds, d_in, seed=index)
        layer = CPULoRALayer(stack, torch.tensor(ranks), torch.tensor(bounds))
        x = torch.randn(len(token_slots), d_in, generator=gen)
        base = torch.randn(len(token_slots), bounds[-1], generator=gen)
        out = base.clone()
        layer.add(out, x, mapping)
        torch.testing.assert_close(out.double(), per_row_reference(base, x, stack, token_slots), rtol=1e-5, atol=1e-5)
    step = mapping.cpu_step()
    assert step is mapping.cpu_step()
    assert step.scratch.shape == (int((token_slots >= 0).sum()), 3 * max(ranks))   # adapter rows, widest layer


def test_a_bound_layer_reads_slots_written_after_binding():
    """A layer is bound when the model is built and its slots are filled when adapters are loaded: the kernel
    reads them as they are at each call (an emptied slot adds nothing)."""
    bounds, ranks = [0, 40, 72], [8, 4, 6]
    stack = new_stack(3, 8, 24, bounds, torch.float32, CPU)
    slot_ranks = torch.zeros(3, dtype=torch.int64)
    layer = CPULoRALayer(stack, slot_ranks, torch.tensor(bounds))
    values = filled_stack(ranks, bounds, 24, seed=5)
    stack.a.copy_(values.a)
    stack.b.copy_(values.b)
    stack.ranks[:] = ranks
    slot_ranks.copy_(torch.tensor(ranks))
    token_slots = np.repeat(SLOT_PER_SEQ, QUERY_LENS)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(len(token_slots), 24, generator=gen)
    base = torch.randn(len(token_slots), bounds[-1], generator=gen)
    out = base.clone()
    layer.add(out, x, LoRABatchMapping.build(SLOT_PER_SEQ, QUERY_LENS, CPU))
    torch.testing.assert_close(out.double(), per_row_reference(base, x, stack, token_slots), rtol=1e-5, atol=1e-5)
    slot_ranks[1] = 0
    stack.ranks[1] = 0
    out = base.clone()
    layer.add(out, x, LoRABatchMapping.build(SLOT_PER_SEQ, QUERY_LENS, CPU))
    torch.testing.assert_close(out.double(), per_row_reference(base, x, stack, token_slots), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[torch.from_numpy(token_slots == 1)], base[torch.from_numpy(token_slots == 1)])
