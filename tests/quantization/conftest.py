"""Quantised checkpoints written from the tiny generated ones (and their dequantised twins), once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmserve.layers import cpu_kernel_build
from llmserve.layers.cpu_kernels import CPUKernels
from llmserve.testing.quantized_checkpoints import write_quantized_checkpoint

# The weight-only Triton kernel runs under the interpreter without a GPU; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session")
def kernels_built_for(tmp_path_factory) -> Callable[[str], CPUKernels]:
    """``kernels_built_for("x86-64-v3")``: the CPU kernels compiled for that ``-march`` instead of this machine's,
    once per session (each build takes the whole compile)."""
    root = tmp_path_factory.mktemp("other-builds")
    built: dict[str, CPUKernels] = {}

    def get(march: str) -> CPUKernels:
        if march not in built:
            flags = tuple(f if f != "-march=native" else f"-march={march}" for f in cpu_kernel_build.CFLAGS)
            library = root / f"lib-{march}.so"
            cpu_kernel_build.compile_library(cpu_kernel_build._compiler(), flags, library)
            built[march] = CPUKernels(library)
        return built[march]

    return get
