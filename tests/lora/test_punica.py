"""The grouped shrink/expand equals a per-row loop over each row's own adapter, projection by projection (base
rows untouched), whichever path a step takes."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from llmserve.layers.cpu_kernel_build import build_library
from llmserve.lora import cpu_ops
from llmserve.lora.cpu_ops import add_lora_cpu, bind_library, cpu_kernel_runs
from llmserve.lora.punica import LoRABatchMapping, LoRAStack, add_lora, new_stack
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
    assert (mapping.padded_segments() is not None
            and len(set(ranks[s] for s, _, _ in mapping.segments) - {0}) == 1) == padded
    add_lora(out, x, stack, mapping)
    expected = per_row_reference(base, x, stack, np.repeat(slot_per_seq, query_lens))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


BF16_ROUNDING = 2.0 ** -8   # a bfloat16 keeps 8 significant bits: rounding to nearest errs by at most half that


@pytest.fixture(params=["native", "without-avx512bf16"])
def lora_kernel(request, monkeypatch):
    """The CPU kernel as this machine builds it and, on x86, as a CPU without AVX512-BF16 builds it (float32
    FMAs on widened bfloat16 operands instead of ``vdpbf16ps``)."""
    if not cpu_kernel_runs(random_stack([1], [0, 1], 1, 1, rank_major_b=True)):
        pytest.skip("the CPU kernels cannot be built here")
    if request.param == "without-avx512bf16":
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("-mno-avx512bf16 is an x86 flag")
        library = bind_library(build_library(("-mno-avx512bf16",)))
        monkeypatch.setattr(cpu_ops, "_library", lambda: library)
    return add_lora_cpu


def assert_kernel_close(out: torch.Tensor, x: torch.Tensor, stack: LoRAStack, expected: torch.Tensor,
                        token_slots: np.ndarray) -> None:
    """float32: the exact sums up to float32 summation noise. bfloat16: the output is rounded once (half a step
    of the exact sum), and on ``vdpbf16ps`` the shrunk values are rounded to bfloat16 before the expand, which
    errs by at most half a step of each product's size: the bound is a step of both, the products' size taken
    as ``|B| (|A| |x|)`` per row (float32 noise is far below either)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        return
    magnitudes = LoRAStack(stack.a.abs(), stack.b.abs(), stack.bounds, stack.ranks)
    scale = per_row_reference(torch.zeros_like(out), x.abs(), magnitudes, token_slots)
    excess = (out.double() - expected).abs() - BF16_ROUNDING * (expected.abs() + scale)
    assert (excess <= 1e-6).all(), f"max excess {excess.max().item():.3g}"


def bf16_stack(stack: LoRAStack, dtype: torch.dtype) -> LoRAStack:
    """``stack`` in ``dtype``, B kept rank-major."""
    return LoRAStack(stack.a.to(dtype), stack.b.transpose(1, 2).to(dtype).transpose(1, 2), stack.bounds, stack.ranks)


@pytest.mark.parametrize("act_dtype,slot_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("slot_per_seq,query_lens,ranks,bounds,d_in,padded", CASES)
def test_cpu_kernel_matches_a_per_row_reference(lora_kernel, slot_per_seq, query_lens, ranks, bounds, d_in, padded,
                                                act_dtype, slot_dtype):
    """The compiled kernel, on B stored rank-major as a CPU layer stores it, over the same steps."""
    gen = torch.Generator().manual_seed(1)
    stack = bf16_stack(random_stack(ranks, bounds, d_in=d_in, max_rank=max(ranks), rank_major_b=True), slot_dtype)
    slot_per_seq, query_lens = np.array(slot_per_seq), np.array(query_lens)
    x = torch.randn(int(query_lens.sum()), d_in, generator=gen).to(act_dtype)
    base = torch.randn(x.shape[0], bounds[-1], generator=gen).to(act_dtype)
    out = base.clone()
    mapping = LoRABatchMapping.build(slot_per_seq, query_lens, torch.device("cpu"))
    lora_kernel(out, x, stack, torch.tensor(ranks), torch.tensor(bounds), mapping)
    token_slots = np.repeat(slot_per_seq, query_lens)
    assert_kernel_close(out, x, stack, per_row_reference(base, x, stack, token_slots), token_slots)


# Layer-sized steps: a q/k/v layer (q of full column tiles, k of one and a part, v a part), rank 64 and 8 adapters.
LAYER_BOUNDS = [0, 256, 336, 384]
LAYER_STEPS = [
    ([0, 1, -1, 2, 0, 3, -1, 1], [1] * 8, [64, 8, 64, 0]),           # decode: segments of 1 and 2 rows, base rows
    ([1, -1, 0, 2], [37, 5, 1, 64], [8, 64, 64, 0]),                  # prefill: segments of 1 and of many rows
    ([3, 3], [70, 30], [0, 8, 64, 64]),                              # one adapter (rank 64) for every row
    ([0, 0, -1], [20, 13, 7], [8, 0, 0, 0]),                         # one adapter (rank 8) and base rows
]


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_per_seq,query_lens,ranks", LAYER_STEPS)
def test_cpu_kernel_on_layer_sized_steps(lora_kernel, slot_per_seq, query_lens, ranks, act_dtype):
    """Rank 8 and 64 adapters mixed with base rows, segments of one row and of many, over a layer's width
    (full register tiles in both phases, an input width that is not a multiple of 32), in the slots a CPU
    layer allocates (B's rows padded past the output width)."""
    gen = torch.Generator().manual_seed(2)
    values = random_stack(ranks, LAYER_BOUNDS, d_in=200, max_rank=64)
    stack = new_stack(len(ranks), 64, 200, LAYER_BOUNDS, act_dtype, torch.device("cpu"))
    assert stack.b.stride(2) > LAYER_BOUNDS[-1]
    stack.a.copy_(values.a * 0.1)
    stack.b.copy_(values.b)
    stack.ranks[:] = ranks
    slot_per_seq, query_lens = np.array(slot_per_seq), np.array(query_lens)
    x = torch.randn(int(query_lens.sum()), 200, generator=gen).to(act_dtype)
    base = torch.randn(x.shape[0], LAYER_BOUNDS[-1], generator=gen).to(act_dtype)
    out = base.clone()
    mapping = LoRABatchMapping.build(slot_per_seq, query_lens, torch.device("cpu"))
    lora_kernel(out, x, stack, torch.tensor(ranks), torch.tensor(LAYER_BOUNDS), mapping)
    token_slots = np.repeat(slot_per_seq, query_lens)
    expected = per_row_reference(base, x, stack, token_slots)
    assert_kernel_close(out, x, stack, expected, token_slots)
    assert torch.equal(out[torch.from_numpy(token_slots < 0)], base[torch.from_numpy(token_slots < 0)])


def test_mappings_without_gathers():
    """No adapter rows: no segments (no work); one adapter for every row: no gather either."""
    cpu = torch.device("cpu")
    assert LoRABatchMapping.build(np.array([-1, -1]), np.array([2, 1]), cpu).segments == []
    one = LoRABatchMapping.build(np.array([4, 4]), np.array([2, 1]), cpu)
    assert one.segments == [(4, 0, 3)] and one.rows is None
