"""Generated PEFT adapters for the tiny checkpoints (written once per session); the Triton interpreter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
