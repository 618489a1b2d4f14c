"""Random weights for the generated checkpoints: each tensor drawn from a generator seeded by ``(seed, tensor
name)``, so the same arguments give byte-identical files and a tensor does not depend on how the file is
sharded; written as one ``model.safetensors`` or as shards the way transformers' ``save_pretrained`` splits them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_layouts import TensorSpec


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"llmserve-testing/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_tensor_seed(seed, spec.name))
    t = spec.init(gen, spec.shape)
    return t if dtype == torch.float32 else t.to(dtype)


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Same greedy split as ``huggingface_hub.split_torch_state_dict_into_shards`` (a tensor larger than
    the limit gets a shard of its own, placed before the shard being filled)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, nbytes in sizes:
        if nbytes > max_shard_bytes:
            shards.append([name])
            continue
        if current_size + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(path: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype, max_shard_bytes: int | None):
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(s.name, s.numel * itemsize) for s in specs]
    by_name = {s.name: s for s in specs}
    # transformers 5's save_pretrained shards the state dict in sorted-name order.
    sizes.sort()
    shards = [[n for n, _ in sizes]] if max_shard_bytes is None else _plan_shards(sizes, int(max_shard_bytes))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file({n: _make_tensor(by_name[n], seed, dtype) for n in shards[0]}, path / "model.safetensors", metadata)
        return
    weight_map = {}
    for k, names in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _make_tensor(by_name[n], seed, dtype) for n in names}
        save_file(tensors, path / filename, metadata)
        del tensors
        weight_map.update({n: filename for n in names})
    index = {
        "metadata": {"total_parameters": sum(s.numel for s in specs), "total_size": sum(b for _, b in sizes)},
        "weight_map": weight_map,
    }
    # Formatted exactly like transformers' save_pretrained.
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
