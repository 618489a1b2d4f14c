"""The packed layouts and their compiled kernels: every code format, group size, odd shape and row count (the
few-row kernels up to 8, the many-row paths above) against the PyTorch reference of the same arithmetic
(dequantise, then ``F.linear``; for W8A8 the exact integer dot products of the per-token quantised
activations)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_kernels import block_weight, cpu_kernels
from llmserve.quantization import packed
from llmserve.quantization.packed import (FP8, U4, U8, apply_w8a8, apply_weight_only, dequantize_weight_only,
                                          pack_nibbles, quantize_rows_int8, set_w8a8, set_weight_only,
                                          unpack_nibbles, w8a8_reference)


@pytest.fixture(autouse=True)
def _kernels_built():
    assert cpu_kernels() is not None, "the test machine has a C compiler"


def test_nibbles_round_trip_in_chunk_order():
    codes = torch.randint(0, 16, (3, 70), dtype=torch.uint8)
    packed_codes = pack_nibbles(codes)
    assert packed_codes.shape == (3, 48)                         # ceil(70 / 32) chunks of 16 bytes
    assert packed_codes[0, 0] == codes[0, 0] | (codes[0, 16] << 4)
    assert torch.equal(unpack_nibbles(packed_codes, 70), codes)


def _weight_only_layer(code_format, n, k, group, zero_point, perm=False, seed=0):
    torch.manual_seed(seed)
    groups = -(-k // group)
    if code_format == FP8:
        codes = (torch.randn(n, k) * 40).clamp(-448, 448)
    else:
        codes = torch.randint(0, 16 if code_format == U4 else 256, (n, k), dtype=torch.uint8)
    zeros = torch.randint(0, 16 if code_format == U4 else 256, (n, groups)).float() if zero_point else None
    layer = nn.Module()
    order = torch.randperm(k) if perm else None
    set_weight_only(layer, codes, code_format, torch.rand(n, groups) * 0.02 + 0.001, zeros, group, order)
    return layer


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("code_format,n,k,group,zero_point", [
    (U4, 48, 128, 32, True), (U4, 20, 200, 64, True), (U4, 17, 77, 77, False), (U4, 16, 96, 128, True),
    (U8, 33, 160, 32, True), (U8, 16, 45, 45, False), (FP8, 40, 100, 100, False), (FP8, 16, 64, 32, False)])
def test_weight_only_kernel_equals_the_reference(code_format, n, k, group, zero_point, rows):
    layer = _weight_only_layer(code_format, n, k, group, zero_point)
    x, bias = torch.randn(rows, k), torch.randn(n)
    expected = F.linear(x, dequantize_weight_only(layer), bias)
    torch.testing.assert_close(apply_weight_only(layer, x, bias), expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(apply_weight_only(layer, x, None), expected - bias, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("code_format,k,group", [(U4, 96, 32), (U4, 77, 77), (U8, 45, 45), (FP8, 64, 32)])
def test_many_rows_go_through_the_dequantised_blocked_weight(code_format, k, group):
    layer = _weight_only_layer(code_format, 32, k, group, code_format != FP8)
    weight = cpu_kernels().dequantize_blocked(layer.wq_codes, code_format, layer.wq_scales, layer.wq_zeros, group, k)
    torch.testing.assert_close(weight, block_weight(dequantize_weight_only(layer)), atol=1e-6, rtol=1e-6)


def test_a_column_permutation_reorders_the_input():
    layer = _weight_only_layer(U4, 32, 64, 32, True, perm=True)
    x = torch.randn(2, 5, 64)
    expected = F.linear(x[..., layer.wq_perm], dequantize_weight_only(layer))
    out = apply_weight_only(layer, x, None)
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


def test_fp8_codes_decode_exactly_subnormals_included():
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = values.isfinite()
    layer = nn.Module()
    set_weight_only(layer, values[finite].view(1, -1), FP8, torch.ones(1, 1), None, int(finite.sum()))
    weight = dequantize_weight_only(layer)
    assert torch.equal(weight[0], values[finite])
    eye = torch.eye(int(finite.sum()))
    assert torch.equal(apply_weight_only(layer, eye, None)[:, 0], values[finite])   # the kernel's decode


def test_weight_only_without_kernels_uses_the_reference(monkeypatch):
    layer = _weight_only_layer(U4, 32, 64, 32, True)
    x = torch.randn(4, 64)
    monkeypatch.setattr(packed, "kernels_for", lambda t: None)
    torch.testing.assert_close(apply_weight_only(layer, x, None), F.linear(x, dequantize_weight_only(layer)))


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="0..15"):
        set_weight_only(nn.Module(), torch.full((2, 32), 16), U4, torch.ones(2, 1), None, 32)
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        set_weight_only(nn.Module(), torch.zeros(2, 64), U8, torch.ones(2, 1), None, 32)
    layer = _weight_only_layer(U8, 16, 64, 64, False)
    layer.wq_group = 20                                      # not a multiple of 32 below k
    with pytest.raises(ValueError, match="group 20"):
        apply_weight_only(layer, torch.randn(1, 64), None)


@pytest.mark.parametrize("rows", [1, 4, 5, 9, 64])
@pytest.mark.parametrize("n,k", [(48, 128), (19, 70), (16, 1)])
def test_w8a8_kernel_equals_the_reference(n, k, rows):
    torch.manual_seed(n + k)
    weight, scale = quantize_rows_int8(torch.randn(n, k))
    layer = nn.Module()
    set_w8a8(layer, weight, scale)
    assert layer.w8_weight.shape[1] % 64 == 0
    x, bias = torch.randn(rows, k) * 3, torch.randn(n)
    x[0] = 0.0                                               # an all-zero row: scale 1, output = bias
    expected = w8a8_reference(x, weight, scale, bias)
    torch.testing.assert_close(apply_w8a8(layer, x, bias), expected, atol=1e-5, rtol=1e-5)
    # ...and the reference is the float product up to the activations' rounding
    exact = F.linear(x, weight.float() * scale)
    assert (expected - bias - exact).norm() <= 0.02 * exact.norm()


def test_w8a8_reports_its_dot_product_path():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    expected = "AVX-512 VNNI" if {"avx512_vnni", "avx512bw"} <= flags else "AVX2" if "avx2" in flags else "portable"
    assert cpu_kernels().w8a8_dot_path == expected


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds the kernels for other x86-64 CPUs")
@pytest.mark.parametrize("march, path", [("x86-64-v3", "AVX2"), ("x86-64", "portable")])
def test_other_builds_give_the_same_results(kernels_built_for, monkeypatch, march, path):
    """The kernels pick their path from the CPU they are built for: built for plain AVX2 (no AVX-512) or
    baseline x86-64, the W8A8 layer gives this machine's output bit for bit and the weight-only one the
    reference's."""
    other = kernels_built_for(march)
    assert other.w8a8_dot_path == path
    weight, scale = quantize_rows_int8(torch.randn(19, 70))
    weight[0], weight[1, ::2] = -128, 127     # the ends of int8, against activations at theirs
    w8a8_layer = nn.Module()
    set_w8a8(w8a8_layer, weight, scale)
    w8a8_x = torch.randn(5, 70) * 3   # the kernel takes up to 8 rows
    w8a8_x[1] = torch.tensor([5.0, -5.0]).repeat(35)
    native = apply_w8a8(w8a8_layer, w8a8_x, None)
    monkeypatch.setattr(packed, "kernels_for", lambda t: other)
    for rows in (1, 9):
        layer = _weight_only_layer(U4, 48, 77, 77, True)
        x = torch.randn(rows, 77)
        torch.testing.assert_close(apply_weight_only(layer, x, None), F.linear(x, dequantize_weight_only(layer)),
                                   atol=2e-4, rtol=1e-4)
    assert torch.equal(apply_w8a8(w8a8_layer, w8a8_x, None), native)
    torch.testing.assert_close(native, w8a8_reference(w8a8_x, weight, scale, None), atol=1e-5, rtol=1e-5)
