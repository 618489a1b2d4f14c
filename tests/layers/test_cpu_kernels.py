"""The compiled CPU kernels: built once per machine and cached, refused clearly where they cannot be
built (the engine then uses the PyTorch paths), and equal to PyTorch's results."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from llmserve.layers import cpu_kernel_build as build
from llmserve.layers import cpu_kernels as module
from llmserve.layers.cpu_kernel_build import CPUKernelsUnavailable, build_library
from llmserve.layers.cpu_kernels import CPU_KERNELS_ENV, cpu_kernels


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
    for bad in (dict(sliding_window=0), dict(soft_cap=0.0), dict(soft_cap=-1.0)):
        with pytest.raises(ValueError, match="sliding_window must be >= 1 and soft_cap > 0"):
            kernels.paged_decode_attention(torch.randn(1, 3, 8), cache, cache, tables, lens, 1.0,
                                           torch.empty(1, 3, 8), **bad)


def test_paged_decode_attention_window_and_soft_cap(kernels):
    """A window of w tokens attends the last w of the context; a soft-cap bends the scores through tanh.
    (Every row kind and backend against a dense reference: tests/layers/attention/test_window_softcap.py.)"""
    torch.manual_seed(0)
    cache_k, cache_v = torch.randn(8, 4, 1, 16), torch.randn(8, 4, 1, 16)
    tables = torch.tensor([[3, 1, 6]], dtype=torch.int32)
    lens = torch.tensor([11], dtype=torch.int32)
    q = torch.randn(1, 2, 16) * 4
    k = cache_k[[3, 1, 6]].reshape(12, 16)[:11]
    v = cache_v[[3, 1, 6]].reshape(12, 16)[:11]
    for window, cap in [(None, None), (4, None), (1, None), (None, 2.0), (6, 2.0), (11, None), (50, 2.0)]:
        scores = q[0] @ k.T * 0.25
        if cap is not None:
            scores = cap * torch.tanh(scores / cap)
        if window is not None:
            scores[:, :max(0, 11 - window)] = float("-inf")
        out = torch.empty(1, 2, 16)
        kernels.paged_decode_attention(q, cache_k, cache_v, tables, lens, 0.25, out, sliding_window=window,
                                       soft_cap=cap)
        torch.testing.assert_close(out[0], scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


def _dense_attention(q, cache_k, cache_v, tables, lens, scale):
    """float64 softmax(q K^T * scale) V of each sequence over its blocks' first lens[i] tokens."""
    num_kv_heads, group = cache_k.shape[2], q.shape[1] // cache_k.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(lens.tolist()):
        k = cache_k[tables[i].long()].flatten(0, 1)[:n].double()
        v = cache_v[tables[i].long()].flatten(0, 1)[:n].double()
        for h in range(q.shape[1]):
            scores = k[:, h // group] @ q[i, h].double() * scale
            out[i, h] = scores.softmax(0) @ v[:, h // group]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 4, 64), (24, 2, 128), (20, 1, 64), (6, 6, 80)])
@pytest.mark.parametrize("num_seqs", [1, 9])   # one KV head per work item; whole sequences per item (2 threads)
def test_paged_decode_attention_matches_dense_reference(kernels, dtype, num_heads, num_kv_heads, head_dim, num_seqs):
    """Any query-head group (past the 8 scored in one pass over the keys), contexts that end inside a run of
    keys or a block, and either split of the work equal the dense softmax."""
    torch.manual_seed(num_heads * num_seqs + head_dim)
    block_size, max_blocks = 16, 4
    cache_k = torch.randn(num_seqs * max_blocks + 1, block_size, num_kv_heads, head_dim).to(dtype)
    cache_v = torch.randn(num_seqs * max_blocks + 1, block_size, num_kv_heads, head_dim).to(dtype)
    tables = torch.randperm(num_seqs * max_blocks + 1)[:num_seqs * max_blocks].reshape(num_seqs, max_blocks)
    tables = tables.to(torch.int32).contiguous()
    lens = torch.tensor([33, 16, 17, 1, 64, 5, 48, 31, 2][:num_seqs], dtype=torch.int32)   # 33: a run and a bit
    q = torch.randn(num_seqs, num_heads, head_dim)
    out = torch.empty(num_seqs, num_heads, head_dim)
    kernels.paged_decode_attention(q, cache_k, cache_v, tables, lens, head_dim ** -0.5, out)
    torch.testing.assert_close(out.double(), _dense_attention(q, cache_k, cache_v, tables, lens, head_dim ** -0.5),
                               atol=2e-6, rtol=1e-5)


def test_library_is_built_once_per_input_and_reused(tmp_path, monkeypatch):
    """On small stand-in sources (the real ones take the whole compile; every other test here runs them)."""
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    sources = tmp_path / "csrc"
    sources.mkdir()
    for index, name in enumerate(build.SOURCES + build.HEADERS):
        (sources / name).write_text(f"int stand_in_{index}(void) {{ return {index}; }}\n")
    monkeypatch.setattr(build, "_SRC_DIR", sources)
    first = build_library()
    assert first.is_relative_to(tmp_path / "kernels") and first.exists()
    mtime = first.stat().st_mtime_ns
    assert build_library() == first and first.stat().st_mtime_ns == mtime   # cached, not rebuilt
    assert {p.name for p in first.parent.iterdir()} == {first.name, ".lock"}   # no temporary files left


def test_concurrent_builders_compile_once_and_share_the_library(tmp_path, monkeypatch):
    """Ranks or test workers starting together on a new machine: one compiles, the others wait and load it."""
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    compiles = []

    def slow_compile(cc, cflags, output):
        compiles.append(output)
        time.sleep(0.3)   # long enough for every other builder to arrive while it runs
        output.write_bytes(b"library")

    monkeypatch.setattr(build, "compile_library", slow_compile)
    with ThreadPoolExecutor(4) as pool:
        libraries = list(pool.map(lambda _: build_library(), range(4)))
    assert len(compiles) == 1 and len(set(libraries)) == 1 and libraries[0].read_bytes() == b"library"


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(CPUKernelsUnavailable, match="no C compiler"):
        build_library()


def test_compile_errors_are_reported_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "csrc"
    broken.mkdir()
    for name in build.SOURCES + build.HEADERS:
        (broken / name).write_text("this is not C;\n")
    monkeypatch.setattr(build, "_SRC_DIR", broken)
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


def test_a_cache_that_cannot_be_written_falls_back_to_pytorch(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "cache"
    blocked.write_text("")   # nothing can be created under it, as on a full or read-only disk
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(blocked))
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        assert cpu_kernels.__wrapped__() is None
    assert "slower PyTorch paths" in caplog.text and str(blocked) in caplog.text


def _pytorch_path(monkeypatch, *modules) -> None:
    for m in modules:
        for name in ("kernels_for", "layer_ops_for"):   # linear layers' kernels, the layer ops'
            if hasattr(m, name):
                monkeypatch.setattr(m, name, lambda x, *dtypes: None)


@pytest.mark.parametrize("shape", [(1, 768), (33, 100), (3, 4, 64)])   # 3-D: per-head q/k norm (Qwen3)
def test_rms_norm_matches_the_pytorch_path(kernels, monkeypatch, shape):
    from llmserve.layers import layernorm
    from llmserve.layers.layernorm import RMSNorm

    torch.manual_seed(len(shape))
    norm = RMSNorm(shape[-1], 1e-5)
    norm.weight.data.normal_()
    x, residual = torch.randn(shape), torch.randn(shape)
    fused, fused_with_residual = norm(x), norm(x, residual)
    _pytorch_path(monkeypatch, layernorm)
    torch.testing.assert_close(fused, norm(x), atol=1e-5, rtol=1e-5)
    for got, expected in zip(fused_with_residual, norm(x, residual)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_silu_and_mul_matches_the_pytorch_path_including_extremes(kernels, monkeypatch):
    from llmserve.layers import activation
    from llmserve.layers.activation import SiluAndMul

    gate = torch.cat([torch.randn(4, 37) * 10, torch.tensor([[-200.0, -88, -1e-4, 0, 1e-4, 88, 200]] * 4)], 1)
    x = torch.cat([gate, torch.randn_like(gate)], 1)
    fused = SiluAndMul()(x)
    _pytorch_path(monkeypatch, activation)
    torch.testing.assert_close(fused, SiluAndMul()(x), atol=1e-5, rtol=1e-5)


def test_rotary_embedding_rotates_strided_q_and_k_in_place(kernels, monkeypatch):
    from llmserve.layers import rotary
    from llmserve.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(64, 512, 10000.0)
    qkv = torch.randn(5, (8 + 2 * 2) * 64)   # q and k are views into one fused projection's output
    positions = torch.tensor([0, 3, 511, 17, 17])
    _pytorch_path(monkeypatch, rotary)
    q_ref, k_ref = rope(positions, qkv[:, :512].reshape(5, 8, 64), qkv[:, 512:640].reshape(5, 2, 64))
    monkeypatch.undo()
    q, k = qkv[:, :512].view(5, 8, 64), qkv[:, 512:640].view(5, 2, 64)
    q_out, k_out = rope(positions, q, k)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q_out, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError, match="outside 0..511"):
        rope(torch.tensor([512] * 5), q, k)


def test_layer_ops_refuse_bad_shapes(kernels):
    with pytest.raises(ValueError, match="2-D torch.float32"):
        kernels.rms_norm(torch.randn(3, 8).t(), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match="weight must be 8"):
        kernels.rms_norm(torch.randn(3, 8), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="float32 or bfloat16 activations"):
        kernels.silu_and_mul(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="positions"):
        kernels.rotary_embedding(torch.zeros(2, dtype=torch.int32), torch.randn(2, 1, 4), torch.randn(2, 1, 4),
                                 torch.ones(8, 2), torch.zeros(8, 2))


def test_row_reductions_match_torch_including_ties_infinities_and_nan(kernels):
    torch.manual_seed(0)
    x = torch.randn(6, 1000) * 20
    x[1, 17] = x[1, 900] = 1e4                       # a tie: the first index wins
    x[2] = float("-inf")                             # everything masked
    x[3, 5] = float("inf")
    x[4, 600] = float("nan")                         # NaN counts as the largest, as in torch
    x[5, :] = 0.0
    assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))
    torch.testing.assert_close(kernels.logsumexp_rows(x), torch.logsumexp(x, dim=-1), equal_nan=True,
                               atol=1e-5, rtol=1e-6)
    odd = torch.randn(3, 37)[:, 1:]                  # rows of 36 with a stride of 37: tails, no padding
    assert torch.equal(kernels.argmax_rows(odd), odd.argmax(dim=-1))
    torch.testing.assert_close(kernels.logsumexp_rows(odd), torch.logsumexp(odd, dim=-1), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        kernels.argmax_rows(torch.empty(2, 0))


@pytest.mark.parametrize("rows", [1, 3, 5, 8, 9, 13, 64])   # the streaming path up to 8 rows, GEMM tiles above
@pytest.mark.parametrize("out_features,in_features", [(16, 7), (48, 64), (80, 100), (320, 768)])
def test_blocked_linear_matches_torch(kernels, rows, out_features, in_features):
    from llmserve.layers.cpu_kernels import block_weight

    torch.manual_seed(rows + out_features)
    x, weight, bias = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    blocked = block_weight(weight)
    assert blocked.shape == (out_features // 16, in_features, 16)
    torch.testing.assert_close(kernels.linear_blocked(x, blocked, bias), F.linear(x, weight, bias),
                               atol=1e-4, rtol=1e-4)
    strided = torch.randn(rows, in_features + 5)[:, 2:2 + in_features]
    torch.testing.assert_close(kernels.linear_blocked(strided, blocked, None), F.linear(strided, weight),
                               atol=1e-4, rtol=1e-4)


def test_blocked_weights_must_be_multiples_of_16_and_match_the_input(kernels):
    from llmserve.layers.cpu_kernels import block_weight

    with pytest.raises(ValueError, match="not a multiple of 16"):
        block_weight(torch.randn(24, 8))
    with pytest.raises(ValueError, match="blocked weight"):
        kernels.linear_blocked(torch.randn(2, 9), block_weight(torch.randn(32, 8)), None)
