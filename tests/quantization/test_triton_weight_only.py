"""The weight-only layout's Triton kernel (under the Triton interpreter without a GPU) against the PyTorch
reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmserve.quantization.packed import FP8, U4, U8, apply_weight_only, dequantize_weight_only
from tests.quantization.test_packed import _weight_only_layer

triton = pytest.importorskip("triton", reason="triton is not installed (the [test] extra)")
from llmserve.quantization.triton_weight_only import (  # noqa: E402 - needs triton
    MAX_KERNEL_ROWS, choose_splits, dequantize_weight, weight_only_linear)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
DEVICE = CUDA if torch.cuda.is_available() else CPU
FORMATS = [(U4, 48, 128, 32, True), (U4, 20, 200, 64, True), (U4, 17, 77, 77, False), (U4, 70, 96, 128, True),
           (U4, 24, 384, 128, True), (U8, 33, 160, 32, True), (U8, 16, 45, 45, False), (U8, 20, 300, 128, False),
           (U8, 24, 100, 40, True),
           (FP8, 40, 100, 100, False), (FP8, 16, 64, 32, False)]


def on_device(layer) -> tuple:
    offsets = getattr(layer, "wq_offsets", None)
    return tuple(None if t is None else t.to(DEVICE) for t in (layer.wq_codes, layer.wq_scales, layer.wq_zeros,
                                                               offsets))


def run_kernel(layer, x: torch.Tensor, bias: torch.Tensor | None, splits: int | None = None) -> torch.Tensor:
    codes, scales, zeros, offsets = on_device(layer)
    return weight_only_linear(x.to(DEVICE), codes, layer.wq_format, scales, zeros, layer.wq_group, layer.wq_in,
                              None if bias is None else bias.to(DEVICE), offsets, splits).cpu()


@pytest.mark.parametrize("rows", [1, 5, MAX_KERNEL_ROWS, MAX_KERNEL_ROWS + 24])
@pytest.mark.parametrize("code_format,n,k,group,zero_point", FORMATS)
def test_kernel_equals_the_reference(code_format, n, k, group, zero_point, rows):
    """4-bit chunks padded past the inputs, partial last groups, a group that is the whole row (any width), spans
    whole tiles, whole 16-column segments or neither (40 columns), zero points or none, row counts up to a full row tile, outputs past one column tile;
    more rows than the kernel takes go through the decoded weight and the float GEMM."""
    layer = _weight_only_layer(code_format, n, k, group, zero_point)
    x, bias = torch.randn(rows, k), torch.randn(n)
    expected = F.linear(x, dequantize_weight_only(layer), bias)
    torch.testing.assert_close(run_kernel(layer, x, bias), expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(run_kernel(layer, x, None), expected - bias, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("code_format,group,zero_point", [(U4, 32, True), (U8, 128, False), (FP8, 600, False)])
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_k_partials_add_up_to_the_reference(code_format, group, zero_point, splits):
    """The inputs split among programs (the last split shorter, or none left for a fifth: four 128-column
    tiles of 600 inputs make at most four non-empty splits): the float32 partial sums add up to the product."""
    layer = _weight_only_layer(code_format, 40, 600, group, zero_point)
    x = torch.randn(3, 600)
    expected = F.linear(x, dequantize_weight_only(layer))
    torch.testing.assert_close(run_kernel(layer, x, None, splits), expected, atol=5e-4, rtol=1e-4)


def test_splits_fill_the_multiprocessors_without_slivers():
    assert choose_splits(output_tiles=32, inputs=2048, multiprocessors=132) == 4     # 16 tiles, 4 per split
    assert choose_splits(output_tiles=32, inputs=8192, multiprocessors=132) == 9     # about two programs per SM
    assert choose_splits(output_tiles=512, inputs=8192, multiprocessors=132) == 1    # the output tiles suffice
    assert choose_splits(output_tiles=1, inputs=100, multiprocessors=132) == 1       # one tile of inputs


@pytest.mark.parametrize("code_format,n,k,group,zero_point", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoded_weight_equals_the_reference(code_format, n, k, group, zero_point, dtype):
    """The one-pass decode (the many-rows path) writes dequantize_weight_only's values in the rows' dtype (within
    one bfloat16 step: the interpreter's conversion truncates where the GPU's rounds)."""
    layer = _weight_only_layer(code_format, n, k, group, zero_point)
    codes, scales, zeros, offsets = on_device(layer)
    weight = dequantize_weight(codes, layer.wq_format, scales, zeros, layer.wq_group, layer.wq_in, dtype, offsets)
    assert weight.dtype == dtype and weight.shape == (n, k)
    rtol = 2 ** -22 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(weight.cpu().float(), dequantize_weight_only(layer), atol=0, rtol=rtol)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K"), ("Q4_K", "Q6_K"), ("Q8_0", "Q5_1"), ("Q2_K", "Q2_K"),
                                   ("Q3_K", "Q4_K")])
def test_gguf_rows_with_offsets(types):
    """A GGUF layer as CUDA keeps it (``W = s * code + o``: 4-bit codes in 32- or 16-column groups, the latter also
    for Q4_K rows beside Q3_K ones, or byte codes in a Q4_K_M qkv layer's 16-column groups): the kernel adds each
    group's offset after its scale."""
    gguf = pytest.importorskip("gguf")
    from llmserve.quantization.gguf import set_gguf_weight_only
    from llmserve.quantization.gguf_blocks import decode_rows
    from llmserve.testing.gguf_kquants import quantize_tensor

    rng = np.random.default_rng(1)
    runs = [decode_rows(quantize_tensor(rng.standard_normal((40, 256)).astype(np.float32), t), t, 256) for t in types]
    layer = torch.nn.Module()
    set_gguf_weight_only(layer, runs, CPU)
    assert layer.wq_offsets is not None and gguf is not None
    x, bias = torch.randn(5, 256), torch.randn(80)
    expected = F.linear(x, dequantize_weight_only(layer), bias)
    torch.testing.assert_close(run_kernel(layer, x, bias), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_give_their_dtype(dtype):
    """The dequantised weight tile takes the rows' dtype for the dot; products accumulate in float32."""
    layer = _weight_only_layer(U4, 48, 128, 32, True)
    x = torch.randn(7, 128).to(dtype)
    out = run_kernel(layer, x, None)
    expected = F.linear(x.float(), dequantize_weight_only(layer).to(dtype).float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_no_rows_give_an_empty_output():
    layer = _weight_only_layer(U8, 16, 45, 45, False)
    assert run_kernel(layer, torch.zeros(0, 45), None).shape == (0, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_layer_on_cuda_applies_the_kernel():
    layer = _weight_only_layer(U4, 32, 64, 32, True, perm=True).to(CUDA)
    x = torch.randn(2, 5, 64)
    expected = F.linear(x[..., layer.wq_perm.cpu()], dequantize_weight_only(layer).cpu())
    torch.testing.assert_close(apply_weight_only(layer, x.to(CUDA), None).cpu(), expected, atol=2e-4, rtol=1e-4)
