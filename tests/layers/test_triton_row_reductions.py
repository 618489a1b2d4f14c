"""The sampler's GPU reductions (Triton; under the interpreter without a GPU) against torch.argmax and
torch.logsumexp: rows past one chunk, masked (-inf) entries, ties, infinite and NaN entries, empty rows."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (the [test] extra)")
from llmserve.layers import triton_row_reductions as reductions  # noqa: E402 - needs triton

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def logits(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(rows, n) * 4
    x[0, torch.randperm(n)[: n // 2]] = -float("inf")   # a grammar's mask
    return x


@pytest.mark.parametrize("rows,n", [(1, 7), (3, 1000), (2, 2 * reductions.CHUNK + 5)])
def test_argmax_and_logsumexp_equal_torch(rows, n):
    x = logits(rows, n)
    assert torch.equal(reductions.argmax_rows(x.to(DEVICE)).cpu(), x.argmax(dim=-1))
    torch.testing.assert_close(reductions.logsumexp_rows(x.to(DEVICE)).cpu(), torch.logsumexp(x, dim=-1),
                               atol=1e-5, rtol=1e-6)


def test_ties_take_the_first_column_across_chunks():
    n = 2 * reductions.CHUNK + 10
    x = torch.zeros(3, n)
    x[0, [5, reductions.CHUNK + 5]] = 3.0           # the same maximum in two chunks
    x[1, [reductions.CHUNK + 7, 2 * reductions.CHUNK + 1]] = 3.0
    x[2] = -float("inf")                             # all masked: torch says column 0
    assert reductions.argmax_rows(x.to(DEVICE)).cpu().tolist() == [5, reductions.CHUNK + 7, 0]


def test_infinities_and_nans_follow_torch():
    n = reductions.CHUNK + 3
    x = torch.randn(4, n)
    x[0, 9] = float("inf")
    x[1, reductions.CHUNK + 1] = float("nan")       # a NaN counts as the largest
    x[1, 3] = float("inf")
    x[2] = -float("inf")
    x[3, [2, reductions.CHUNK]] = float("inf")
    on = x.to(DEVICE)
    assert reductions.argmax_rows(on).cpu().tolist() == x.argmax(dim=-1).tolist() == [9, reductions.CHUNK + 1, 0, 2]
    lse = reductions.logsumexp_rows(on).cpu()
    expected = torch.logsumexp(x, dim=-1)
    assert lse[0] == lse[3] == float("inf") and torch.isnan(lse[1]) and lse[2] == -float("inf")
    assert torch.equal(lse.isnan(), expected.isnan()) and torch.equal(lse[[0, 2, 3]], expected[[0, 2, 3]])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D float32"):
        reductions.argmax_rows(torch.zeros(2, 4, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="rows are empty"):
        reductions.argmax_rows(torch.zeros(2, 0, device=DEVICE))
    assert reductions.logsumexp_rows(torch.zeros(2, 0, device=DEVICE)).cpu().tolist() == [-float("inf")] * 2
