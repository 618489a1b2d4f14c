"""Checkpoint rewrites the MoE family tests share: the per-expert tensors stacked the way transformers 5 keeps them
in memory (``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]), and the check that a
model's layers are sparse or dense where the family's config says."""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmserve.models.moe import SparseMoeBlock

_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")


def with_fused_experts(tmp_path: Path, base: Path, gate: str, up: str, down: str) -> Path:
    """A copy of ``base`` whose experts are stored stacked per layer under ``mlp.experts`` (the router under
    ``mlp.gate``), as transformers 5 names its parameters; ``gate``/``up``/``down``: the checkpoint's names."""
    path = Path(shutil.copytree(base, tmp_path / "fused-experts"))
    tensors = load_file(str(path / "model.safetensors"))
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out = {}
    for name, tensor in tensors.items():
        match = _EXPERT.match(name)
        if match:
            layer, expert, proj = match.groups()
            experts[layer][proj][int(expert)] = tensor
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
    for layer, projs in experts.items():
        gate_w, up_w, down_w = (torch.stack([projs[p][e] for e in sorted(projs[p])]) for p in (gate, up, down))
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate_w, up_w], dim=1)
        out[f"{layer}.mlp.experts.down_proj"] = down_w
    (path / "model.safetensors").unlink()
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def sparse_layers(model: torch.nn.Module) -> list[bool]:
    """Per decoder layer: whether its feed-forward block is the sparse MoE block."""
    return [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
