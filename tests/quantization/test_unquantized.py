"""The unquantised method: plain [out, in] weights, stored blocked after loading where the CPU kernels
run, and every path computes ``F.linear``; a quantisation config's method is what a layer uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from llmserve.quantization import unquantized
from llmserve.quantization.base import QuantizationConfig, QuantizeMethodBase
from llmserve.quantization.unquantized import UnquantizedLinearMethod


def make_layer(out_sizes, in_size=40, seed=0):
    torch.manual_seed(seed)
    layer, method = nn.Module(), UnquantizedLinearMethod()
    loader = object()
    method.create_weights(layer, in_size, out_sizes, in_size, sum(out_sizes), torch.float32, weight_loader=loader)
    assert layer.weight.shape == (sum(out_sizes), in_size) and layer.weight.weight_loader is loader
    assert layer.weight.output_dim == 0 and layer.weight.input_dim == 1 and not layer.weight.requires_grad
    layer.weight.data.normal_()
    return layer, method


@pytest.mark.parametrize("rows", [1, 5, 8, 9, 64])
def test_blocked_path_equals_f_linear(rows):
    assert cpu_kernels() is not None, "the test machine has a C compiler"
    layer, method = make_layer([16, 32])
    plain = layer.weight.detach().clone()
    bias, x = torch.randn(48), torch.randn(rows, 40)
    method.process_weights_after_loading(layer)
    assert layer.weight.shape == (3, 40, 16)   # blocked: one copy, [out/16, in, 16]
    torch.testing.assert_close(method.apply(layer, x, bias), F.linear(x, plain, bias), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(method.apply(layer, x), F.linear(x, plain), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 9])
def test_bf16_weights_are_blocked_in_pairs_and_equal_f_linear(rows):
    layer, method = make_layer([16, 32], in_size=41)
    layer.weight.data = layer.weight.data.bfloat16()
    plain = layer.weight.detach().clone()
    x, bias = torch.randn(rows, 41).bfloat16(), torch.randn(48).bfloat16()
    method.process_weights_after_loading(layer)
    assert layer.weight.shape == (3, 21, 16, 2)   # [out/16, ceil(in/2), 16, 2]
    out = method.apply(layer, x, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), plain.float(), bias.float()), atol=0.05, rtol=2 ** -7)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
def test_a_plain_bf16_weight_runs_the_row_major_kernel_on_few_rows(monkeypatch, rows):
    """A bfloat16 weight that stays [out, in] (20 rows: not blockable; a tied LM head) gets the row-major kernel
    where it is faster than oneDNN: up to ROW_MAJOR_BF16_MAX_ROWS rows."""
    layer, method = make_layer([20], in_size=41)
    layer.weight.data = layer.weight.data.bfloat16()
    method.process_weights_after_loading(layer)
    assert layer.weight.shape == (20, 41)
    kernels, calls = cpu_kernels(), []
    bf16_linear = kernels.linear_bf16

    def recording(*args):
        calls.append(args)
        return bf16_linear(*args)

    monkeypatch.setattr(kernels, "linear_bf16", recording)
    x, bias = torch.randn(rows, 41).bfloat16(), torch.randn(20).bfloat16()
    out = method.apply(layer, x, bias)
    assert out.dtype == torch.bfloat16 and len(calls) == (rows <= unquantized.ROW_MAJOR_BF16_MAX_ROWS)
    torch.testing.assert_close(out.float(), F.linear(x.float(), layer.weight.float(), bias.float()), atol=0.05,
                               rtol=2 ** -7)


def test_weights_it_cannot_block_stay_plain(monkeypatch):
    odd, method = make_layer([20])                    # not a multiple of 16
    method.process_weights_after_loading(odd)
    assert odd.weight.dim() == 2
    half, method = make_layer([32])
    half.weight.data = half.weight.data.half()        # the kernels are float32 and bfloat16 only
    method.process_weights_after_loading(half)
    assert half.weight.dim() == 2
    monkeypatch.setattr(unquantized, "cpu_kernels", lambda: None)
    no_kernels, method = make_layer([32])
    expected = F.linear(x := torch.randn(3, 40), no_kernels.weight)
    method.process_weights_after_loading(no_kernels)
    assert no_kernels.weight.dim() == 2
    torch.testing.assert_close(method.apply(no_kernels, x), expected, atol=1e-5, rtol=1e-5)


class _Recording(QuantizeMethodBase):
    """Delegates to the unquantised method and records the calls (stands in for a real format)."""

    def __init__(self) -> None:
        self.inner, self.calls = UnquantizedLinearMethod(), []

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra):
        self.calls.append(("create", input_size_per_partition, tuple(output_partition_sizes)))
        self.inner.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                                  params_dtype, **extra)

    def process_weights_after_loading(self, layer):
        self.calls.append(("process",))

    def apply(self, layer, x, bias=None):
        self.calls.append(("apply",))
        return self.inner.apply(layer, x, bias)


class _Config(QuantizationConfig):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def get_name(self) -> str:
        return "recording"

    def get_quant_method(self, layer, prefix):
        self.asked.append(prefix)
        return _Recording() if prefix.endswith("gate_up_proj") else None   # None: leave it unquantised


def test_layers_take_their_method_from_the_quantization_config():
    config = _Config()
    merged = MergedColumnParallelLinear(32, [16, 16], quant_config=config, prefix="model.layers.0.mlp.gate_up_proj")
    plain = ReplicatedLinear(32, 16, quant_config=config, prefix="model.layers.0.other")
    assert config.asked == ["model.layers.0.mlp.gate_up_proj", "model.layers.0.other"]
    assert isinstance(plain.quant_method, UnquantizedLinearMethod)
    method = merged.quant_method
    assert method.calls == [("create", 32, (16, 16))]
    merged.weight.data.normal_()
    merged(torch.randn(2, 32))
    merged.process_weights_after_loading()
    assert method.calls[1:] == [("apply",), ("process",)]
