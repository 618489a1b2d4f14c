"""The W8A8 layout's Triton kernel (under the Triton interpreter without a GPU): the reference's arithmetic exactly,
int8 rows times int8 weights summed as integers, then both scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmserve.quantization.packed import apply_w8a8, quantize_rows_int8, set_w8a8, w8a8_reference

triton = pytest.importorskip("triton", reason="triton is not installed (the [test] extra)")
from llmserve.quantization.triton_w8a8 import w8a8_linear  # noqa: E402 - needs triton

CUDA = torch.device("cuda")
DEVICE = CUDA if torch.cuda.is_available() else torch.device("cpu")


def w8a8_layer(n: int, k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    codes, scale = quantize_rows_int8(torch.randn(n, k))
    layer = nn.Module()
    set_w8a8(layer, codes, scale.reshape(n))
    return layer


def run_kernel(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return w8a8_linear(x.to(DEVICE), layer.w8_weight.to(DEVICE), layer.w8_scale.to(DEVICE), layer.w8_in,
                       None if bias is None else bias.to(DEVICE)).cpu()


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("n,k", [(48, 128), (70, 100), (16, 45), (33, 300)])
def test_kernel_equals_the_reference(n, k, rows):
    """Inputs that are not a multiple of 32 (the weight rows' padding is never read), outputs past a column
    tile, rows below and above one row tile; with an outlier row, so rows get scales far apart."""
    layer = w8a8_layer(n, k)
    x, bias = torch.randn(rows, k), torch.randn(n)
    x[0] *= 50
    reference = w8a8_reference(x, layer.w8_weight[:, :k], layer.w8_scale, bias)
    assert torch.equal(run_kernel(layer, x, bias), reference)
    assert torch.equal(run_kernel(layer, x, None), w8a8_reference(x, layer.w8_weight[:, :k], layer.w8_scale, None))


def test_half_precision_rows_give_their_dtype():
    layer = w8a8_layer(48, 128)
    x = torch.randn(7, 128).to(torch.bfloat16)
    out = run_kernel(layer, x, None)
    assert out.dtype == torch.bfloat16
    expected = w8a8_reference(x.float(), layer.w8_weight[:, :128], layer.w8_scale, None)
    torch.testing.assert_close(out.float(), expected, atol=0, rtol=2 ** -7)   # the float32 result, in bf16


def test_no_rows_give_an_empty_output():
    assert run_kernel(w8a8_layer(16, 45), torch.zeros(0, 45), None).shape == (0, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_layer_on_cuda_applies_the_kernel():
    layer = w8a8_layer(32, 64).to(CUDA)
    x = torch.randn(2, 5, 64)
    expected = w8a8_reference(x.reshape(10, 64), layer.w8_weight[:, :64].cpu(), layer.w8_scale.cpu(), None)
    assert torch.equal(apply_w8a8(layer, x.to(CUDA), None).cpu(), expected.view(2, 5, 32))
