"""Which implementation runs the per-row ops: the CPU kernels for CPU tensors of their dtypes, the Triton kernels
for CUDA tensors, the PyTorch formulas otherwise."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.layer_ops import layer_ops_for, row_reductions_for, triton_module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tensors_get_the_cpu_kernels(dtype):
    assert layer_ops_for(torch.zeros(2, 4, dtype=dtype)) is cpu_kernels()


def test_other_cpu_dtypes_get_the_pytorch_formulas():
    assert layer_ops_for(torch.zeros(2, 4, dtype=torch.float16)) is None
    assert layer_ops_for(torch.zeros(2, 4, dtype=torch.float64)) is None


def test_row_reductions_take_float32_only():
    assert row_reductions_for(torch.zeros(2, 4)) is cpu_kernels()
    assert row_reductions_for(torch.zeros(2, 4, dtype=torch.bfloat16)) is None


def test_a_missing_module_reads_as_none():
    assert triton_module("no_such_kernels") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_get_the_triton_kernels():
    from llmserve.layers import triton_layer_ops, triton_row_reductions

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert layer_ops_for(torch.zeros(2, 4, dtype=dtype, device="cuda")) is triton_layer_ops
    assert layer_ops_for(torch.zeros(2, 4, dtype=torch.float64, device="cuda")) is None
    assert row_reductions_for(torch.zeros(2, 4, device="cuda")) is triton_row_reductions
