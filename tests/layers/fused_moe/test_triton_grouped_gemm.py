"""The Triton grouped GEMM for experts against the per-token reference.

Without a GPU it runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by this folder's
conftest.py before triton is imported), so shapes stay small; they are chosen not to fill whole tiles
(hidden and intermediate sizes not multiples of the tile sizes, experts whose rows end mid-tile, experts with
no row, more tiles than rows)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")

from llmserve.layers.activation import SiluAndMul
from llmserve.layers.fused_moe import triton_grouped_gemm as kernels
from tests.layers.fused_moe.reference import per_token_moe, random_routing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
E, H, I = 5, 40, 24


def test_align_groups_rows_by_expert_in_whole_tiles():
    _, ids = random_routing(9, E, 2, used_experts=3, seed=4)
    rows, tile_experts = kernels.align_by_expert(ids, E, block_m=4)
    n = ids.numel()
    assert rows.numel() == tile_experts.numel() * 4 and rows.numel() >= n + E * 3
    flat = ids.flatten()
    real = rows[rows < n]
    assert sorted(real.tolist()) == list(range(n))                # every row exactly once
    for tile, expert in enumerate(tile_experts.tolist()):
        tile_rows = rows[tile * 4:(tile + 1) * 4]
        tile_rows = tile_rows[tile_rows < n]
        if expert < 0:
            assert tile_rows.numel() == 0                         # tiles past the last expert are empty
        else:
            assert (flat[tile_rows] == expert).all() and tile_rows.numel() > 0
    assert set(tile_experts.tolist()) - {-1} == set(flat.tolist())  # experts without rows get no tile


@pytest.mark.parametrize("tokens, top_k, used, dtype", [
    (1, 1, None, torch.float32), (13, 2, 3, torch.float32), (21, 3, None, torch.float32),
    (6, 5, None, torch.float32), (17, 2, None, torch.bfloat16)])
def test_fused_experts_match_the_per_token_reference(tokens, top_k, used, dtype):
    gen = torch.Generator().manual_seed(tokens)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5)
    w2 = (torch.randn(E, H, I, generator=gen) / I ** 0.5)
    x = torch.randn(tokens, H, generator=gen)
    weights, ids = random_routing(tokens, E, top_k, used, seed=top_k)
    out = kernels.fused_experts(x.to(DEVICE, dtype), w13.to(DEVICE, dtype), w2.to(DEVICE, dtype),
                                weights.to(DEVICE), ids.to(DEVICE), SiluAndMul())
    assert out.dtype == dtype and out.shape == (tokens, H)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    expected = per_token_moe(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
    torch.testing.assert_close(out.double().cpu(), expected, atol=tol, rtol=tol)


def test_slots_of_experts_held_elsewhere_add_nothing():
    """Expert parallelism: the id E marks experts another rank holds; their tiles are skipped."""
    gen = torch.Generator().manual_seed(9)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(E, H, I, generator=gen) / I ** 0.5
    x = torch.randn(11, H, generator=gen)
    weights, ids = random_routing(11, E + 2, 2, seed=9)   # 7 experts, 5 of them here
    remote = ids >= E
    out = kernels.fused_experts(x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), weights.to(DEVICE),
                                ids.masked_fill(remote, E).to(DEVICE), SiluAndMul())
    expected = per_token_moe(x, w13, w2, weights.masked_fill(remote, 0.0), ids.masked_fill(remote, 0))
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)
