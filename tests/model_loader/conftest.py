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
# below 27B, Gemma's attention scale is its head size (the tiny checkpoints use hidden / heads, as the 27B).
DESCRIBABLE = {"gemma2": {"query_pre_attn_scalar": 16}, "gemma3": {"query_pre_attn_scalar": 16}}


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
            config = json.loads((copy / "config.json").read_text())
            (copy / "config.json").write_text(json.dumps({**config, **DESCRIBABLE[family]}))
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
