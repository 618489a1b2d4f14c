"""Tokenizer loading (through transformers, so chat templates and special tokens come with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a checkpoint folder, Hub id or GGUF file (built from the file's metadata)."""
    from transformers import AutoTokenizer

    try:
        if Path(path).suffix == ".gguf":   # the GGUF reader needs torch: imported for GGUF files only
            from llmserve.model_loader.gguf_loader import load_gguf_tokenizer
            from llmserve.model_loader.model_source import is_gguf

            if is_gguf(Path(path)):
                return load_gguf_tokenizer(Path(path))
        return AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {path}: {exc}") from None
