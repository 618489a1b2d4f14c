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
# does; the tiny V3 leaves it implied by noaux_tc); llama.cpp's Gemma 4 KV-sharing layers read the last two
# layers holding a cache, which must be a sliding then a full one (the tiny checkpoints' last two are a full then a
# sliding one: one layer more shares).
DESCRIBABLE = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16},
               "qwen2_moe": {"mlp_only_layers": [], "decoder_sparse_step": 1},
               "qwen3_moe": {"mlp_only_layers": [], "decoder_sparse_step": 1},
               "deepseek_v3": {"scoring_func": "sigmoid"}, "gemma4": {"num_kv_shared_layers": 3},
               "gemma4_moe": {"num_kv_shared_layers": 3}}


def _rewrite_tensors(folder: Path, change: Callable[[dict], None]) -> None:
    """The checkpoint copy's tensors, changed in place by ``change`` and saved as one file."""
    from safetensors.torch import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    tensors = {name: t for f in files for name, t in load_file(f).items()}
    for f in files:
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")


def _seeded_normal() -> Callable[..., object]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=generator) / shape[-1] ** 0.5


def _shared_kv_from_config(folder: Path, config: dict) -> None:
    """A Gemma 4 copy whose ``num_kv_shared_layers`` grew: the newly sharing layers lose their K/V projections
    and key norm and get double-wide MLPs (random, seeded) where the family has them."""
    normal = _seeded_normal()
    hidden, width = config["hidden_size"], 2 * config["intermediate_size"]

    def change(tensors: dict) -> None:
        for layer in range(config["num_hidden_layers"] - config["num_kv_shared_layers"], config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}."
            for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight"):
                tensors.pop(prefix + name, None)
            if config.get("use_double_wide_mlp") and tensors[f"{prefix}mlp.down_proj.weight"].shape[1] != width:
                tensors[f"{prefix}mlp.gate_proj.weight"] = normal(width, hidden)
                tensors[f"{prefix}mlp.up_proj.weight"] = normal(width, hidden)
                tensors[f"{prefix}mlp.down_proj.weight"] = normal(hidden, width)

    _rewrite_tensors(folder, change)


def _sparse_everywhere(folder: Path, config: dict) -> None:
    """Give each dense layer of a Qwen MoE checkpoint copy a router and experts (and a gated shared expert
    where the family has one), random and seeded, as its sparse layers have."""
    normal = _seeded_normal()
    hidden, width, shared = config["hidden_size"], config["moe_intermediate_size"], \
        config.get("shared_expert_intermediate_size") or 0

    def change(tensors: dict) -> None:
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

    _rewrite_tensors(folder, change)


# The tensors a describable copy's config needs changed, per family.
_TENSOR_CHANGES = {"qwen2_moe": _sparse_everywhere, "qwen3_moe": _sparse_everywhere,
                   "gemma4": _shared_kv_from_config, "gemma4_moe": _shared_kv_from_config}


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
            if family in _TENSOR_CHANGES:
                _TENSOR_CHANGES[family](copy, config)
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
def wide_gguf_file(gguf_dir) -> Callable[..., Path]:
    """``wide_gguf_file(file_type, family="qwen2")`` -> a checkpoint wide enough for k-quant super-blocks (hidden
    256, MLP 512: the ``bench-draft`` size) as a GGUF file of that type (written once)."""
    from llmserve.testing.checkpoints import write_checkpoint

    def get(file_type: str, family: str = "qwen2") -> Path:
        source = gguf_dir / f"{family}-wide-checkpoint"
        if not source.exists():
            write_checkpoint(source, family=family, size="bench-draft", seed=0)
        out = gguf_dir / f"{family}-wide-{file_type}.gguf"
        return out if out.exists() else write_gguf(source, out, family, file_type)

    return get
