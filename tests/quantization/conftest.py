"""Quantised checkpoints written from the tiny generated ones (and their dequantised twins), once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.testing.quantized_checkpoints import write_quantized_checkpoint


@pytest.fixture(scope="session")
def quantized(checkpoint_dir, tmp_path_factory):
    """``quantized(fmt, family="llama", **options)`` -> (quantised folder, dequantised float folder)."""
    root = tmp_path_factory.mktemp("quantized")
    cache: dict[tuple, tuple[Path, Path]] = {}

    def get(fmt: str, family: str = "llama", **options) -> tuple[Path, Path]:
        key = (fmt, family, *sorted(options.items()))
        if key not in cache:
            name = "-".join([fmt, family, *(f"{k}{v}" for k, v in sorted(options.items()))])
            cache[key] = write_quantized_checkpoint(checkpoint_dir(family), root / name, fmt, **options)
        return cache[key]

    return get
