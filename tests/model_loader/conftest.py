"""GGUF files written from the tiny checkpoints (once per session), for the GGUF loader's tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llmserve.testing.checkpoints import FAMILIES
from llmserve.testing.gguf_files import write_gguf
from llmserve.testing.tokenizer_files import BYTELEVEL

# What llama.cpp infers rather than writes, set in a copy of the checkpoint so that a file can describe it:
# below 27B, Gemma's attention scale is its head size (the tiny checkpoints use hidden / heads, as the 27B);
# llama.cpp's Qwen MoE architectures have experts in every layer (the tiny checkpoints have a dense one);
# llama.cpp gates deepseek2 experts by sigmoid only where the config says scoring_func sigmoid (as DeepSeek-V3's
# does; the tiny V3 leaves it implied by noaux_tc).
DESCRIBABLE = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16},
               "qwen2_moe": {"mlp_only_layers": [], "decoder_sparse_step": 1},
               "qwen3_moe": {"mlp_only_layers": [], "decoder_sparse_step": 1},
               "deepseek_v3": {"scoring_func": "sigmoid"}}


def _sparse_everywhere(folder: Path, config: dict) -> None:
    """Give each dense layer of a Qwen MoE checkpoint copy a router and experts (and a gated shared expert
    where the family has one), random and seeded, as its sparse layers have."""
    import torch
    from safetensors.torch import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    tensors = {name: t for f in files for name, t in load_file(f).items()}
    for f in files:
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(0)
    hidden, width, shared = config["hidden_size"], config["moe_intermediate_size"], \
        config.get("shared_expert_intermediate_size") or 0

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp."
        if f"{prefix}gate_proj.weight" not in tensors:
            continue
        for projection in ("gate_proj", "up_proj", "down_proj"):
            del tensors[f"{prefix}{projection}.weight"]
        tensors[f"{prefix}gate.weight"] = normal(config["num_experts"], hidden) * 1.5
        for expert in range(config["num_experts"]):
            tensors[f"{prefix}experts.{expert}.gate_proj.weight"] = normal(width, hidden)
            tensors[f"{prefix}experts.{expert}.up_proj.weight"] = normal(width, hidden)
            tensors[f"{prefix}experts.{expert}.down_proj.weight"] = normal(hidden, width)
        if shared:
            tensors[f"{prefix}shared_expert.gate_proj.weight"] = normal(shared, hidden)
            tensors[f"{prefix}shared_expert.up_proj.weight"] = normal(shared, hidden)
            tensors[f"{prefix}shared_expert.down_proj.weight"] = normal(hidden, shared)
            tensors[f"{prefix}shared_expert_gate.weight"] = normal(1, hidden)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def gguf_source(checkpoint_dir, gguf_dir) -> Callable[[str], Path]:
    """``gguf_source(family)`` -> the checkpoint a GGUF file of ``family`` is written from (and compared with)."""

    def get(family: str) -> Path:
        if family not in DESCRIBABLE:
            return checkpoint_dir(family)
        copy = gguf_dir / f"{family}-checkpoint"
        if not copy.exists():
            shutil.copytree(checkpoint_dir(family), copy)
            config = {**json.loads((copy / "config.json").read_text()), **DESCRIBABLE[family]}
            (copy / "config.json").write_text(json.dumps(config))
            if family.endswith("_moe"):
                _sparse_everywhere(copy, config)
        return copy

    return get


@pytest.fixture(scope="session")
def gguf_file(gguf_source, gguf_dir) -> Callable[[str, str], Path]:
    """``gguf_file(family, file_type)`` -> that checkpoint as a GGUF file of that type (written once)."""

    def get(family: str, file_type: str) -> Path:
        out = gguf_dir / f"{family}-{file_type}.gguf"
        return out if out.exists() else write_gguf(gguf_source(family), out, family, file_type)

    return get


@pytest.fixture(scope="session")
def gguf_tokenizer(checkpoint_dir) -> Callable[[str], dict[str, str]]:
    """``gguf_tokenizer(family)`` -> the engine's tokenizer argument for a GGUF file of ``family``: none for
    byte-level BPE (the file's own); the checkpoint folder's for the sentencepiece families, whose files carry
    llama.cpp's ``llama`` tokenizer, which transformers builds as the real model's (Phi-3's adds its prefix space
    in a normalizer, unlike the generated checkpoint's Metaspace), so the checkpoint's own stays the oracle."""
    return lambda family: ({} if FAMILIES[family].tokenizer_kind == BYTELEVEL
                           else {"tokenizer": str(checkpoint_dir(family))})


@pytest.fixture(scope="session")
def wide_gguf_file(gguf_dir) -> Callable[[str], Path]:
    """``wide_gguf_file(file_type)`` -> a Qwen2 checkpoint wide enough for k-quant super-blocks (hidden 256,
    MLP 512: the ``bench-draft`` size) as a GGUF file of that type (written once)."""
    from llmserve.testing.checkpoints import write_checkpoint

    def get(file_type: str) -> Path:
        source = gguf_dir / "qwen2-wide-checkpoint"
        if not source.exists():
            write_checkpoint(source, family="qwen2", size="bench-draft", seed=0)
        out = gguf_dir / f"qwen2-wide-{file_type}.gguf"
        return out if out.exists() else write_gguf(source, out, "qwen2", file_type)

    return get
