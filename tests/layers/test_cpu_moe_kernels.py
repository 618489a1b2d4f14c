"""The compiled MoE entry points: sorting rows by expert (stable, other ranks' slots left out), the grouped GEMM
(each expert's rows get exactly the dense blocked kernel's result on that expert's weight, whatever the row count,
panel width or thread count) and the weighted combine (float32 sums, rounded once)."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.cpu_kernels import block_weight, cpu_kernels
from llmserve.layers.cpu_moe_kernels import CPUMoEKernels, cpu_moe_kernels

BF16_ROUNDING = 2.0 ** -8


@pytest.fixture(scope="module")
def moe() -> CPUMoEKernels:
    loaded = cpu_moe_kernels()
    assert loaded is not None, "the test machine has a C compiler"
    return loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_sort_by_expert_in_token_order_and_other_ranks_slots_get_no_row(moe, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 24, generator=gen).to(dtype)
    ids = torch.randint(0, 5, (9, 3), generator=gen)   # 4 local experts; id 4 is another rank's
    rows, offsets, slot_rows = moe.sort_rows(x, ids, 4)
    flat = ids.flatten()
    order = flat.argsort(stable=True)[:int((flat < 4).sum())]
    assert torch.equal(rows, x[order // 3])
    assert offsets.tolist() == [0, *torch.bincount(flat, minlength=5)[:4].cumsum(0).tolist()]
    expected_rows = torch.full((27,), -1, dtype=torch.int64)
    expected_rows[order] = torch.arange(len(order))
    assert torch.equal(slot_rows.flatten(), expected_rows)
    with pytest.raises(ValueError, match="0..4"):
        moe.sort_rows(x, ids + 1, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(48, 37), (144, 64)])   # a narrow panel; odd k; 2+ panels
@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_linear_gives_each_expert_the_dense_kernels_result(moe, dtype, out_features, in_features, threads):
    kernels = cpu_kernels()
    counts = [3, 0, 17, 8, 1, 30]   # no rows, few rows (streamed in float32), several row tiles
    gen = torch.Generator().manual_seed(out_features)
    weights = [torch.randn(out_features, in_features, generator=gen).to(dtype) for _ in counts]
    x = torch.randn(sum(counts), in_features, generator=gen).to(dtype)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = moe.grouped_linear(x, torch.stack([block_weight(w) for w in weights]), offsets)
    finally:
        torch.set_num_threads(previous)
    dense = kernels.linear_bf16 if dtype == torch.bfloat16 else kernels.linear_blocked
    for e, w in enumerate(weights):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            assert torch.equal(out[start:end], dense(x[start:end], block_weight(w), None)), f"expert {e}"


def test_grouped_linear_refuses_mismatched_operands(moe):
    weights = torch.stack([block_weight(torch.randn(32, 8)) for _ in range(3)])
    with pytest.raises(ValueError, match="offsets"):
        moe.grouped_linear(torch.randn(5, 8), weights, torch.tensor([0, 2, 2, 4]))
    with pytest.raises(ValueError, match="blocked expert weights"):
        moe.grouped_linear(torch.randn(5, 9), weights, torch.tensor([0, 2, 2, 5]))
    with pytest.raises(ValueError, match="bfloat16"):
        moe.grouped_linear(torch.randn(5, 8).bfloat16(), weights, torch.tensor([0, 2, 2, 5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [5, 200])   # one thread; split over threads (200 x 400 values)
def test_combine_sums_each_tokens_weighted_slots_and_rounds_once(moe, dtype, tokens):
    gen = torch.Generator().manual_seed(tokens)
    expert_out = torch.randn(2 * tokens, 400, generator=gen).to(dtype)
    slot_rows = torch.randperm(2 * tokens, generator=gen).view(tokens, 2)
    slot_rows[0, 1] = -1   # another rank's expert: adds nothing
    slot_rows[1] = -1      # a token with no local expert: zeros
    weights = torch.rand(tokens, 2, generator=gen)
    out = moe.combine(expert_out, slot_rows, weights)
    expected = torch.zeros(tokens, 400, dtype=torch.float64)
    for t in range(tokens):
        for s in range(2):
            if slot_rows[t, s] >= 0:
                expected[t] += float(weights[t, s]) * expert_out[slot_rows[t, s]].double()
    assert out.dtype == dtype and not out[1].any()
    bound = (BF16_ROUNDING if dtype == torch.bfloat16 else 0.0) * expected.abs() + 1e-5
    assert ((out.double() - expected).abs() <= bound).all()
