"""The compiled CPU kernels: built once per machine and cached, refused clearly where they cannot be
built (the engine then uses the PyTorch paths), and equal to PyTorch's results."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from llmserve.layers import cpu_kernels as module
from llmserve.layers.cpu_kernels import CPU_KERNELS_ENV, CPUKernelsUnavailable, build_library, cpu_kernels


@pytest.fixture
def kernels():
    loaded = cpu_kernels()
    assert loaded is not None, "the test machine has a C compiler"
    return loaded


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("in_features", [64, 768, 1000, 7])   # multiples of the 64-float step, and tails
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_batch_linear_matches_torch(kernels, rows, in_features, with_bias):
    torch.manual_seed(rows * in_features)
    x = torch.randn(rows, in_features)
    weight = torch.randn(301, in_features)
    bias = torch.randn(301) if with_bias else None
    torch.testing.assert_close(kernels.linear_small_batch(x, weight, bias), F.linear(x, weight, bias),
                               atol=1e-4, rtol=1e-4)


def test_small_batch_linear_reads_strided_rows(kernels):
    base = torch.randn(4, 200)
    x = base[:, 10:138]   # rows 200 floats apart, unit stride inside a row
    weight = torch.randn(50, 128)
    torch.testing.assert_close(kernels.linear_small_batch(x, weight, None), F.linear(x, weight),
                               atol=1e-4, rtol=1e-4)


def test_small_batch_linear_refuses_what_it_cannot_do(kernels):
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match=f"1..{kernels.max_linear_rows} rows"):
        kernels.linear_small_batch(torch.randn(kernels.max_linear_rows + 1, 16), weight, None)
    with pytest.raises(ValueError, match="must be contiguous"):
        kernels.linear_small_batch(torch.randn(1, 8), weight.t(), None)


def test_paged_decode_attention_refuses_bad_head_counts_and_index_types(kernels):
    cache = torch.zeros(4, 2, 3, 8)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="not a multiple"):
        kernels.paged_decode_attention(torch.randn(1, 4, 8), cache, cache, tables, lens, 1.0, torch.empty(1, 4, 8))
    with pytest.raises(TypeError, match="int32"):
        kernels.paged_decode_attention(torch.randn(1, 3, 8), cache, cache, tables.long(), lens, 1.0,
                                       torch.empty(1, 3, 8))


def test_library_is_built_once_per_input_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    first = build_library()
    assert first.is_relative_to(tmp_path / "kernels") and first.exists()
    mtime = first.stat().st_mtime_ns
    assert build_library() == first and first.stat().st_mtime_ns == mtime   # cached, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]        # no temporary files left


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    with pytest.raises(CPUKernelsUnavailable, match="no C compiler"):
        build_library()


def test_compile_errors_are_reported_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "csrc"
    broken.mkdir()
    for name in module.SOURCES:
        (broken / name).write_text("this is not C;\n")
    monkeypatch.setattr(module, "_SRC_DIR", broken)
    with pytest.raises(CPUKernelsUnavailable, match="compiling the CPU kernels failed"):
        build_library()
    assert not any(p.suffix == ".so" for p in (tmp_path / "kernels").rglob("*"))


def test_disabled_or_unbuildable_kernels_fall_back_with_a_log_line(monkeypatch, caplog):
    load = cpu_kernels.__wrapped__   # the uncached loader
    monkeypatch.setenv(CPU_KERNELS_ENV, "0")
    with caplog.at_level(logging.INFO, logger=module.__name__):
        assert load() is None
    assert "disabled" in caplog.text
    monkeypatch.setenv(CPU_KERNELS_ENV, "1")

    def fail() -> None:
        raise CPUKernelsUnavailable("no C compiler found")

    monkeypatch.setattr(module, "build_library", fail)
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        assert load() is None
    assert "no C compiler found" in caplog.text
