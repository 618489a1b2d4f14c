"""The group-int8 kernel: activations quantised per 32 columns to int8, multiplied by 4-, 6- or 8-bit codes.

* Its activation quantisation is the PyTorch one (:func:`quantize_activations`), code for code.
* Its output equals ``x_q8 @ dequant(W)^T`` computed in float64 from the same quantised activations, to
  float32 rounding (relative 1e-5 of the output's size), for 4- and 8-bit codes in groups of 16 and 32, on 1,
  3, 16 and 64 rows (the few-row and the register-tiled paths), odd output sizes and a bias.
* A row's output is the same, bit for bit, whether it is multiplied alone (the few-row path) or among many
  (the many-row paths, which take rows in register tiles or stream them past codes held in registers, in
  passes of 64 rows).
* Against the float product ``x @ W^T`` the only difference is the activations' rounding, which bounds it:
  ``|y - x W^T| <= |x - x_q8| @ |W|^T`` elementwise (``|x - x_q8| <= scale / 2`` per column).
* A fused layer of segments in different formats writes each segment's columns.
* Every dot-product path (AVX-512 VNNI, AVX2, portable) gives the same output bit for bit: a build for plain
  AVX2 and one for baseline x86-64 equal this machine's; codes at the ends of their range times activations
  at theirs, where int16 sums are at or past their limits, come out right on few rows and on many.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from torch import nn

from llmserve.layers.cpu_group_int8 import GroupInt8Kernels, group_int8_kernels
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.quantization import group_int8
from llmserve.quantization.gguf_blocks import GroupCodes
from llmserve.quantization.group_int8 import (GroupInt8Segment, apply_group_int8, group_int8_reference,
                                              quantize_activations, set_group_int8)

# (bits, group, groups per block, offset): the layouts of the GGUF types, named by one of each
FORMATS = [pytest.param(4, 32, 1, "m", id="Q4_1"), pytest.param(4, 32, 1, "zero", id="Q4_0"),
           pytest.param(4, 32, 8, "mins", id="Q4_K"), pytest.param(4, 16, 16, "mins", id="Q2_K"),
           pytest.param(4, 16, 16, "zero", id="Q3_K"), pytest.param(8, 32, 1, "zero", id="Q8_0"),
           pytest.param(6, 32, 8, "mins", id="Q5_K"), pytest.param(6, 16, 16, "zero", id="Q6_K"),
           pytest.param(8, 16, 4, "mins", id="8-bit-16")]


def _codes(rows: int, k: int, bits: int, group: int, seed: int, per_block: int = 1, offset: str = "m") -> GroupCodes:
    """Random codes and scale factors of one layout, fp16 ``d`` of both signs with a subnormal and a zero."""
    rng = np.random.default_rng(seed)
    groups = k // group
    codes = rng.integers(0, 1 << bits, (rows, k)).astype(np.uint8)
    d = (rng.uniform(0.001, 0.05, (rows, groups // per_block)) * rng.choice([-1, 1], (rows, 1))).astype(np.float16)
    d.flat[0], d.flat[-1] = np.float16(3e-7), np.float16(0)
    sc = rng.integers(-32, 32, (rows, groups)).astype(np.int8) if per_block > 1 else None
    m = mins = None
    if offset != "zero":
        m = (-rng.uniform(0.001, 0.5, d.shape)).astype(np.float16)
        mins = rng.integers(0, 64, (rows, groups)).astype(np.uint8) if offset == "mins" else None
    return GroupCodes(codes, d, sc, m, mins, 1 << (bits - 1) if offset == "zero" else 0, bits, group, per_block)


def _kernels() -> GroupInt8Kernels:
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the CPU kernels are not available here")
    return group_int8_kernels(kernels)


def test_activations_are_quantised_as_the_reference_quantises_them():
    x = torch.randn(5, 96) * torch.tensor([0.01, 1.0, 30.0]).repeat_interleave(32)
    x[1, 32:64] = 0.0
    x[2, 64:96] = torch.arange(32) - 15.5      # scale 127 / 127 = 1 after the 127 below: every code a tie
    x[2, 95] = 127.0
    ours = _kernels().quantize(x)
    q, scale = quantize_activations(x)
    assert torch.equal(ours.q, q) and torch.equal(ours.scale, scale)
    assert q[2, 64:68].tolist() == [-16, -14, -14, -12]   # halves round to even
    expected_sums = (q.float().view(5, -1, 16).sum(-1) * scale.repeat_interleave(2, dim=1))
    torch.testing.assert_close(ours.sums, expected_sums, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [1, 3, 16, 64])
@pytest.mark.parametrize("bits,group,per_block,offset", FORMATS)
def test_kernel_equals_the_float64_product_of_the_quantised_activations(bits, group, per_block, offset, rows):
    n, k = 37, 256
    layer = nn.Module()
    set_group_int8(layer, [_codes(n, k, bits, group, bits + group, per_block, offset)])
    x, bias = torch.randn(rows, k), torch.randn(n)
    out = apply_group_int8(layer, x, bias)
    expected = group_int8_reference(x, layer.group_int8_segments[0]) + bias.double()
    assert out.shape == (rows, n)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("rows", [4, 9, 13, 64, 70])
@pytest.mark.parametrize("bits,group,per_block,offset", FORMATS)
def test_many_rows_give_each_row_what_it_gets_alone(bits, group, per_block, offset, rows):
    """Rows in register tiles with a remainder, in passes of 64 rows with a partial last one (70)."""
    n, k = 37, 256   # three output tiles, the last partial: a pair and one alone
    layer = nn.Module()
    set_group_int8(layer, [_codes(n, k, bits, group, rows + bits, per_block, offset)])
    x, bias = torch.randn(rows, k), torch.randn(n)
    together = apply_group_int8(layer, x, bias)
    alone = torch.cat([apply_group_int8(layer, x[m:m + 1], bias) for m in range(rows)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("bits,group,per_block,offset", FORMATS)
def test_kernel_differs_from_the_float_product_only_by_the_activation_rounding(bits, group, per_block, offset):
    layer = nn.Module()
    set_group_int8(layer, [_codes(40, 256, bits, group, 3, per_block, offset)])
    weight = layer.group_int8_segments[0].dequantize().double()
    x = torch.randn(9, 256) * 4
    q, scale = quantize_activations(x)
    rounding = (x.double() - (q.double().view(9, -1, 32) * scale.double().unsqueeze(-1)).view(9, 256)).abs()
    assert rounding.max() <= scale.max() / 2 + 1e-6
    bound = rounding @ weight.abs().T
    error = (apply_group_int8(layer, x, None).double() - x.double() @ weight.T).abs()
    assert (error <= bound * (1 + 1e-4) + 1e-5).all()
    assert error.max() > 0   # the activations really are rounded


def test_segments_in_different_formats_write_their_own_columns():
    k = 64
    parts = [_codes(20, k, 4, 32, 1), _codes(7, k, 8, 16, 2, 4, "zero"), _codes(16, k, 4, 16, 3, 2, "mins")]
    layer = nn.Module()
    set_group_int8(layer, parts)
    x, bias = torch.randn(6, k), torch.randn(43)
    expected = torch.cat([group_int8_reference(x, s) for s in layer.group_int8_segments], dim=1) + bias.double()
    out = apply_group_int8(layer, x, bias)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bfloat16_activations_come_back_in_bfloat16():
    layer = nn.Module()
    set_group_int8(layer, [_codes(16, 64, 8, 32, 0)])
    x = torch.randn(2, 3, 64).bfloat16()
    out = apply_group_int8(layer, x, None)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 16)
    torch.testing.assert_close(out.float(), group_int8_reference(x.reshape(6, 64).float(), layer.group_int8_segments[0])
                               .float().view(2, 3, 16), rtol=1e-2, atol=1e-2)


def test_unsupported_layouts_are_refused():
    with pytest.raises(ValueError, match="groups of 16 or 32"):
        GroupInt8Segment(GroupCodes(np.zeros((2, 64), np.uint8), np.ones((2, 1), np.float16), None, None, None, 0,
                                    8, 64))
    with pytest.raises(ValueError, match="codes below 2\\^bits"):   # a 6-bit segment holding a code of 64
        GroupInt8Segment(GroupCodes(np.full((2, 64), 64, np.uint8), np.ones((2, 2), np.float16), None, None, None,
                                    0, 6, 32))
    for per_block in (3, 0):   # blocks of 3 groups, or of none
        with pytest.raises(ValueError, match="power of 2"):
            GroupInt8Segment(GroupCodes(np.zeros((2, 96), np.uint8), np.ones((2, 1), np.float16),
                                        np.ones((2, 3), np.int8), None, None, 0, 8, 32, per_block))
    with pytest.raises(ValueError, match="multiple of 32"):
        _kernels().quantize(torch.randn(1, 48))


def test_reports_its_dot_product_path():
    flags = set(open("/proc/cpuinfo").read().split())
    expected = ("AVX-512 VNNI" if {"avx512_vnni", "avx512bw"} <= flags
                else "AVX2" if {"avx2", "fma"} <= flags else "portable")
    assert _kernels().dot_path == expected


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("x_rows", [2, 12])
def test_extreme_codes_times_extreme_activations_are_exact(bits, x_rows):
    """Codes 255 (or 63, or 15) and 0 against activations at +-127, on few and many rows: a naive u8 x s8 pair
    sum of 8-bit codes (2 x 255 x 127) overflows int16, two 6-bit pair sums (4 x 63 x 127) just fit, and so do
    the 16 products of 4-bit codes a group of 32 columns sums in one int16 lane (16 x 15 x 127)."""
    rows, k, top = 16, 64, (1 << bits) - 1
    codes = np.where(np.arange(rows * k).reshape(rows, k) % 3 == 0, 0, top).astype(np.uint8)
    codes[rows // 2:] = top
    layer = nn.Module()
    set_group_int8(layer, [GroupCodes(codes, np.ones((rows, k // 32), np.float16), None, None, None, 0, bits, 32)])
    x = torch.full((x_rows, k), 1.0)
    x[1::2, ::2] = -1.0
    expected = x.double() @ torch.from_numpy(codes.astype(np.float64)).T   # +-1 quantise to 127 x (1 / 127)
    assert (apply_group_int8(layer, x, None).double() - expected).abs().max() < 1e-3


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds the kernels for other x86-64 CPUs")
@pytest.mark.parametrize("march, path", [("x86-64-v3", "AVX2"), ("x86-64", "portable")])
def test_other_builds_give_the_same_results(kernels_built_for, monkeypatch, march, path):
    other = kernels_built_for(march)
    assert group_int8_kernels(other).dot_path == path
    for bits, group, per_block, offset in (f.values for f in FORMATS):
        layer = nn.Module()
        set_group_int8(layer, [_codes(21, 256, bits, group, bits * group, per_block, offset)])
        for rows in (1, 6, 13, 70):
            x = torch.randn(rows, 256)
            native = apply_group_int8(layer, x, None)
            with monkeypatch.context() as patch:
                patch.setattr(group_int8, "kernels_for", lambda t: other)
                assert torch.equal(apply_group_int8(layer, x, None), native)
