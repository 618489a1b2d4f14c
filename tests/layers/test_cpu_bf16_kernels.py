"""The bfloat16 paths of the compiled CPU kernels against float32 PyTorch on the same bfloat16 values.

Every kernel sums in float32 and rounds its outputs to bfloat16 once (the layer ops where transformers
rounds), so each output is within one bfloat16 rounding (relative 2^-8) of the float32 result of the same
inputs, plus float32 summation-order noise. The linear kernels (pair-blocked and row-major weights) run on
AVX512-BF16 where the CPU has it and on float32 FMAs over widened weights elsewhere, and calls of many rows on AMX
tiles where the CPU has those: every build is tested here (the others with ``-mno-avx512bf16`` and
``-mno-amx-tile``, which any x86 compiler accepts)."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmserve.layers.cpu_kernel_build import build_library
from llmserve.layers.cpu_kernels import CPUKernels, block_weight, cpu_kernels

BF16_ROUNDING = 2.0 ** -8   # a bfloat16 keeps 8 significant bits


def _cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.fixture(scope="module", params=["native", "without-avx512bf16", "without-amx"])
def kernels(request):
    if request.param == "native":
        loaded = cpu_kernels()
        assert loaded is not None, "the test machine has a C compiler"
        assert _cpu_has_amx() or not loaded.bf16_uses_amx   # (a kernel older than Linux 5.16 grants no tiles)
        return loaded
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"{request.param} builds with an x86 flag")
    if request.param == "without-avx512bf16":
        built = CPUKernels(build_library(("-mno-avx512bf16",)))
        assert not built.bf16_uses_dpbf16
    else:
        built = CPUKernels(build_library(("-mno-amx-tile", "-mno-amx-bf16")))
        assert not built.bf16_uses_amx
    return built


def _assert_within_bf16(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | float) -> None:
    """``got`` (bfloat16) is ``expected`` (float32) rounded once, up to float32 noise relative to ``scale`` (the
    size of the terms summed)."""
    assert got.dtype == torch.bfloat16
    err = (got.float() - expected).abs()
    bound = BF16_ROUNDING * expected.abs() + 1e-5 * scale + 1e-30
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("rows", [1, 3, 6, 7, 17, 64])   # one tile, a tile and a tail, several tiles
@pytest.mark.parametrize("out_features,in_features", [(16, 1), (48, 37), (80, 64), (320, 770)])
def test_bf16_linear_matches_float32_torch(kernels, rows, out_features, in_features):
    torch.manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features).bfloat16()
    weight, bias = torch.randn(out_features, in_features).bfloat16(), torch.randn(out_features).bfloat16()
    blocked = block_weight(weight)
    assert blocked.shape == (out_features // 16, (in_features + 1) // 2, 16, 2)
    scale = x.float().abs() @ weight.float().abs().T + bias.float().abs()
    _assert_within_bf16(kernels.linear_bf16(x, blocked, bias), F.linear(x.float(), weight.float(),
                                                                                bias.float()), scale)
    strided = torch.randn(rows, in_features + 3).bfloat16()[:, 1:1 + in_features]
    _assert_within_bf16(kernels.linear_bf16(strided, blocked, None),
                        strided.float() @ weight.float().T, strided.float().abs() @ weight.float().abs().T)


@pytest.mark.parametrize("rows", [4, 16, 31, 33, 70])   # one or two AMX row tiles, full or partial
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (48, 96), (80, 800)])   # odd block counts
def test_bf16_linear_of_many_rows_matches_float32_torch(kernels, rows, out_features, in_features):
    """The calls that go to AMX tiles where the CPU has them: input columns a multiple of 32, rows past one tile."""
    torch.manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features + 5).bfloat16()[:, 2:2 + in_features]   # a row stride past the row
    weight, bias = torch.randn(out_features, in_features).bfloat16(), torch.randn(out_features).bfloat16()
    scale = x.float().abs() @ weight.float().abs().T + bias.float().abs()
    _assert_within_bf16(kernels.linear_bf16(x, block_weight(weight), bias),
                        F.linear(x.float(), weight.float(), bias.float()), scale)


def test_calls_run_on_the_amx_tiles_where_linux_grants_them():
    """Calls with input columns a multiple of 32 are the tile kernel's, bit for bit (its sums round differently
    from the vector kernel's in a few outputs); other input widths it declines."""
    kernels = cpu_kernels()
    assert kernels is not None
    if not kernels.bf16_uses_amx:
        pytest.skip("no AMX tiles on this CPU (or Linux does not grant them)")
    panel = kernels.library.llmserve_bf16_amx_panel
    panel.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    torch.manual_seed(0)
    for rows, k in [(1, 64), (2, 64), (33, 96), (70, 800), (64, 2048)]:   # the last ones round differently somewhere
        x = torch.randn(rows, k).bfloat16()
        weight, bias = block_weight(torch.randn(48, k).bfloat16()), torch.randn(48).bfloat16()
        direct = torch.zeros(rows, 48, dtype=torch.bfloat16)
        assert panel(x.data_ptr(), k, weight.data_ptr(), k, bias.data_ptr(), direct.data_ptr(), 48, rows, 3) == 1
        assert torch.equal(kernels.linear_bf16(x, weight, bias), direct)
    x = torch.randn(4, 40).bfloat16()
    weight = block_weight(torch.randn(16, 40).bfloat16())
    assert panel(x.data_ptr(), 40, weight.data_ptr(), 40, None, torch.empty(4, 16).bfloat16().data_ptr(), 16, 4, 1) == 0


@pytest.mark.parametrize("in_features", [96, 770])   # on AMX tiles where the CPU has them, or not
def test_a_rows_output_does_not_depend_on_the_rows_beside_it(kernels, in_features):
    torch.manual_seed(in_features)
    x = torch.randn(37, in_features).bfloat16()
    weight, bias = block_weight(torch.randn(80, in_features).bfloat16()), torch.randn(80).bfloat16()
    together = kernels.linear_bf16(x, weight, bias)
    for i in (0, 16, 36):
        assert torch.equal(kernels.linear_bf16(x[i:i + 1], weight, bias), together[i:i + 1])
        assert torch.equal(kernels.linear_bf16(x[i:i + 5], weight, bias), together[i:i + 5])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])   # one tile, a tile and a tail, several tiles
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (7, 31), (50, 33), (83, 770), (16, 64)])
def test_bf16_linear_on_a_row_major_weight_matches_float32_torch(kernels, rows, out_features, in_features):
    """A weight that keeps its [out, in] layout (a tied LM head): any out, in not a multiple of the 32 values
    one step reads."""
    torch.manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features).bfloat16()
    weight, bias = torch.randn(out_features, in_features).bfloat16(), torch.randn(out_features).bfloat16()
    scale = x.float().abs() @ weight.float().abs().T + bias.float().abs()
    _assert_within_bf16(kernels.linear_bf16(x, weight, bias), F.linear(x.float(), weight.float(), bias.float()),
                        scale)
    strided = torch.randn(rows, in_features + 3).bfloat16()[:, 1:1 + in_features]
    _assert_within_bf16(kernels.linear_bf16(strided, weight, None), strided.float() @ weight.float().T,
                        strided.float().abs() @ weight.float().abs().T)


def test_bf16_blocked_layout_pairs_input_columns():
    weight = torch.arange(32 * 3, dtype=torch.float32).view(32, 3).bfloat16()
    blocked = block_weight(weight)
    assert blocked.shape == (2, 2, 16, 2)
    assert blocked[1, 0, 5].tolist() == weight[21, 0:2].tolist()
    assert blocked[1, 1, 5].tolist() == [weight[21, 2].item(), 0.0]   # odd in_features: a zero column


def test_bf16_linear_refuses_mismatched_operands(kernels):
    weight = block_weight(torch.randn(32, 8).bfloat16())
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.linear_bf16(torch.randn(2, 8), weight, None)
    with pytest.raises(ValueError, match="not a contiguous bfloat16"):
        kernels.linear_bf16(torch.randn(2, 10).bfloat16(), weight, None)
    with pytest.raises(ValueError, match="not a contiguous bfloat16"):
        kernels.linear_bf16(torch.randn(2, 8).bfloat16(), weight, torch.randn(32))
    row_major = torch.randn(30, 8).bfloat16()
    with pytest.raises(ValueError, match="not a contiguous bfloat16"):
        kernels.linear_bf16(torch.randn(2, 10).bfloat16(), row_major, None)
    with pytest.raises(ValueError, match="not a contiguous bfloat16"):
        kernels.linear_bf16(torch.randn(2, 8).bfloat16(), row_major.T.contiguous().T, None)
    with pytest.raises(ValueError, match="bias is not bfloat16"):
        kernels.linear_bf16(torch.randn(2, 8).bfloat16(), row_major, torch.randn(31).bfloat16())


def _pytorch_path(monkeypatch, *modules) -> None:
    for m in modules:
        for name in ("kernels_for", "layer_ops_for"):   # linear layers' kernels, the layer ops'
            if hasattr(m, name):
                monkeypatch.setattr(m, name, lambda x, *dtypes: None)


@pytest.mark.parametrize("norm_class", ["RMSNorm", "GemmaRMSNorm"])
def test_bf16_rms_norm_rounds_as_the_pytorch_path(monkeypatch, norm_class):
    from llmserve.layers import layernorm

    torch.manual_seed(1)
    norm = getattr(layernorm, norm_class)(100, 1e-5)
    if norm_class == "RMSNorm":
        norm.weight.data = torch.randn(100).bfloat16()
    else:
        norm.weight.data.normal_()   # Gemma keeps 1 + w in float32
    x, residual = torch.randn(17, 100).bfloat16(), torch.randn(17, 100).bfloat16()
    fused, (fused_norm, fused_sum) = norm(x), norm(x, residual)
    _pytorch_path(monkeypatch, layernorm)
    expected_norm, expected_sum = norm(x, residual)
    assert torch.equal(fused_sum, expected_sum)   # one rounding of an exact float32 sum
    for got, expected in ((fused, norm(x)), (fused_norm, expected_norm)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=2 * BF16_ROUNDING)


def test_bf16_silu_and_mul_and_rotary_match_the_pytorch_path(monkeypatch):
    from llmserve.layers import activation, rotary
    from llmserve.layers.activation import SiluAndMul
    from llmserve.layers.rotary import RotaryEmbedding

    torch.manual_seed(2)
    gate = torch.cat([torch.randn(3, 37) * 10, torch.tensor([[-200.0, -88, -1e-4, 0, 1e-4, 88, 200]] * 3)], 1)
    x = torch.cat([gate, torch.randn_like(gate)], 1).bfloat16()
    rope = RotaryEmbedding(64, 512, 10000.0)
    qkv = torch.randn(5, 12 * 64).bfloat16()
    positions = torch.tensor([0, 3, 511, 17, 17])
    fused = SiluAndMul()(x)
    q, k = qkv[:, :512].view(5, 8, 64), qkv[:, 512:640].view(5, 2, 64)
    q_ref, k_ref = q.clone(), k.clone()
    rope(positions, q, k)   # in place
    _pytorch_path(monkeypatch, activation, rotary)
    torch.testing.assert_close(fused.float(), SiluAndMul()(x).float(), atol=1e-6, rtol=2 * BF16_ROUNDING)
    q_ref, k_ref = rope(positions, q_ref, k_ref)
    for got, expected in ((q, q_ref), (k, k_ref)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=BF16_ROUNDING)


@pytest.mark.parametrize("head_dim", [64, 24])   # the vector path and the scalar one
def test_paged_decode_attention_reads_a_bf16_cache(head_dim):
    kernels = cpu_kernels()
    torch.manual_seed(3)
    cache_k, cache_v = torch.randn(8, 4, 2, head_dim).bfloat16(), torch.randn(8, 4, 2, head_dim).bfloat16()
    tables = torch.tensor([[3, 1, 6], [0, 2, 0]], dtype=torch.int32)
    lens = torch.tensor([11, 5], dtype=torch.int32)
    q = torch.randn(2, 4, head_dim).bfloat16()
    out = torch.empty(2, 4, head_dim, dtype=torch.bfloat16)
    kernels.paged_decode_attention(q, cache_k, cache_v, tables, lens, 0.125, out)
    for s in range(2):
        rows = tables[s].long()
        k = cache_k[rows].reshape(-1, 2, head_dim)[:lens[s]].float().repeat_interleave(2, dim=1)
        v = cache_v[rows].reshape(-1, 2, head_dim)[:lens[s]].float().repeat_interleave(2, dim=1)
        scores = torch.einsum("hd,thd->ht", q[s].float(), k) * 0.125
        expected = torch.einsum("ht,thd->hd", scores.softmax(-1), v)
        _assert_within_bf16(out[s], expected, torch.ones(()))
    with pytest.raises(TypeError, match="both float32 or both bfloat16"):
        kernels.paged_decode_attention(q, cache_k, cache_v, tables, lens, 0.125, torch.empty(2, 4, head_dim))
