"""Generated PEFT adapters for the tiny checkpoints (written once per session); the Triton interpreter; random
stacked slots and the per-row reference the batched ops are checked against."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from llmserve.lora.punica import LoRAStack
from llmserve.testing.lora_adapters import write_lora_adapter

# The Triton kernels run under the interpreter without a GPU; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Three adapters that differ in every way the format allows: all projections at rank 8; q/v only with
# rsLoRA at rank 4; every projection with rank_pattern/alpha_pattern giving the MLP its own rank and alpha.
ADAPTERS = {
    "all-r8": {"r": 8, "lora_alpha": 16, "seed": 1},
    "qv-rslora-r4": {"r": 4, "lora_alpha": 8, "seed": 2, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    "patterns": {"r": 4, "lora_alpha": 8, "seed": 3, "rank_pattern": {"down_proj": 8, "gate_proj": 2},
                 "alpha_pattern": {"mlp.up_proj": 32}},
}


@pytest.fixture(scope="session")
def lora_adapter(checkpoint_dir, tmp_path_factory: pytest.TempPathFactory):
    """``lora_adapter(name, family="llama", **overrides)`` -> folder of a generated adapter (cached)."""
    root = tmp_path_factory.mktemp("lora")
    cache: dict[tuple, Path] = {}

    def get(name: str, family: str = "llama", **overrides) -> Path:
        key = (name, family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            options = {**ADAPTERS.get(name, {}), **overrides}
            cache[key] = write_lora_adapter(root / f"{family}-{name}-{len(cache)}", checkpoint_dir(family), **options)
        return cache[key]

    return get


def random_stack(ranks: list[int], bounds: list[int], d_in: int, max_rank: int, seed: int = 0,
                 rank_major_b: bool = False) -> LoRAStack:
    """A layer's slots holding random adapters of ``ranks`` (one per slot; 0: none) over the projections whose
    output rows ``bounds`` delimits, zeros past each rank as the slots hold them. B is contiguous, or stored
    rank-major (``rank_major_b``) as a CPU layer stores it."""
    gen = torch.Generator().manual_seed(seed)
    projections = len(bounds) - 1
    a = torch.zeros(len(ranks), projections * max_rank, d_in)
    b = (torch.zeros(len(ranks), max_rank, bounds[-1]).transpose(1, 2) if rank_major_b
         else torch.zeros(len(ranks), bounds[-1], max_rank))
    for slot, r in enumerate(ranks):
        a[slot, :projections * r] = torch.randn(projections * r, d_in, generator=gen)
        b[slot, :, :r] = torch.randn(bounds[-1], r, generator=gen)
    return LoRAStack(a, b, bounds, list(ranks))


def per_row_reference(base: torch.Tensor, x: torch.Tensor, stack: LoRAStack, token_slots: np.ndarray) -> torch.Tensor:
    """``base`` plus each row's own adapter delta, projection by projection, in float64."""
    out = base.double().clone()
    for row, slot in enumerate(token_slots):
        r = stack.ranks[slot] if slot >= 0 else 0
        for i in range(stack.num_projections if r else 0):
            lo, hi = stack.bounds[i], stack.bounds[i + 1]
            a, b = stack.a[slot, i * r:(i + 1) * r].double(), stack.b[slot, lo:hi, :r].double()
            out[row, lo:hi] += b @ (a @ x[row].double())
    return out
