"""Which implementation runs the layer ops: the CPU kernels for CPU tensors of their dtypes, the Triton ops for
CUDA tensors, the PyTorch formulas otherwise."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.layer_ops import layer_ops_for, triton_layer_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tensors_get_the_cpu_kernels(dtype):
    assert layer_ops_for(torch.zeros(2, 4, dtype=dtype)) is cpu_kernels()


def test_other_cpu_dtypes_get_the_pytorch_formulas():
    assert layer_ops_for(torch.zeros(2, 4, dtype=torch.float16)) is None
    assert layer_ops_for(torch.zeros(2, 4, dtype=torch.float64)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_get_the_triton_ops():
    from llmserve.layers import triton_layer_ops as ops

    assert triton_layer_ops() is ops
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert layer_ops_for(torch.zeros(2, 4, dtype=dtype, device="cuda")) is ops
    assert layer_ops_for(torch.zeros(2, 4, dtype=torch.float64, device="cuda")) is None
