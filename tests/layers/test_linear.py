"""``apply_linear``: every path it takes on CPU computes ``x W^T + b``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmserve.layers import linear as linear_module
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.layers.linear import apply_linear


@pytest.mark.parametrize("rows", [1, 4, 8, 9, 64])   # the small-batch kernel up to 8 rows, oneDNN above
def test_apply_linear_matches_f_linear(rows):
    torch.manual_seed(rows)
    x, weight, bias = torch.randn(rows, 96), torch.randn(40, 96), torch.randn(40)
    torch.testing.assert_close(apply_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)


def test_small_batches_take_the_compiled_kernel(monkeypatch):
    kernels = cpu_kernels()
    assert kernels is not None
    calls = []
    original = kernels.linear_small_batch
    monkeypatch.setattr(kernels, "linear_small_batch", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    x, weight = torch.randn(kernels.max_linear_rows + 1, 16), torch.randn(8, 16)
    apply_linear(x[:1], weight, None)
    apply_linear(x, weight, None)
    assert calls == [1]


def test_without_kernels_or_in_other_dtypes_results_stay_the_same(monkeypatch):
    x, weight = torch.randn(2, 32), torch.randn(8, 32)
    expected = F.linear(x, weight)
    monkeypatch.setattr(linear_module, "cpu_kernels", lambda: None)
    torch.testing.assert_close(apply_linear(x, weight, None), expected, atol=1e-5, rtol=1e-5)
    out = apply_linear(x.bfloat16(), weight.bfloat16(), None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_blocked_layout_keeps_the_results_and_skips_what_it_cannot_block():
    from llmserve.layers.embedding import LMHead, VocabEmbedding
    from llmserve.layers.linear import Linear

    torch.manual_seed(0)
    layer = Linear(40, 48, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(11, 40)
    expected = layer(x)
    layer.use_blocked_layout()
    assert layer.weight.shape == (3, 40, 16)                       # one copy, blocked
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x[:2]), expected[:2], atol=1e-4, rtol=1e-4)
    odd = Linear(40, 20)                                            # 20 outputs: not a multiple of 16
    odd.use_blocked_layout()
    assert odd.weight.shape == (20, 40)
    embedding = VocabEmbedding(64, 40)
    tied = LMHead(64, 40, tie_to=embedding)                         # the embedding reads rows of it
    tied.use_blocked_layout()
    assert tied.weight.shape == (64, 40)


def test_loaded_cpu_models_store_linear_weights_blocked(llama_dir):
    from llmserve import LLM

    model = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB").engine.runner.model
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dim() == 3 and layer.mlp.down_proj.weight.dim() == 3
