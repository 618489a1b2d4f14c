"""The GPU's layer ops (Triton; under the interpreter without a GPU) against the PyTorch formulas they replace:
RMSNorm with and without the residual add (Llama's and Gemma's rounding), SiLU-gating, the rotary embedding
(partial, over strided q / k views of one qkv tensor)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed (the [test] extra)")
from llmserve.layers import triton_layer_ops as ops  # noqa: E402 - needs triton
from llmserve.layers.layernorm import GemmaRMSNorm, RMSNorm  # noqa: E402
from llmserve.layers.rotary import RotaryEmbedding, _rotate  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
# float32 to rounding; bfloat16 within two steps of its 8-bit mantissa (the interpreter truncates conversions
# where the GPU rounds them, and Llama's RMSNorm rounds twice)
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2 ** -6)}


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu().float(), expected.float(), **TOLERANCE[expected.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_class", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("rows,n", [(1, 64), (5, 100), (3, 2048)])
def test_rms_norm_equals_the_pytorch_formula(dtype, norm_class, rows, n):
    torch.manual_seed(0)
    norm = norm_class(n, eps=1e-5)
    norm.weight.data = (torch.randn(n) * 0.5 + 1).to(norm.weight.dtype if norm_class is GemmaRMSNorm else dtype)
    x, residual = (torch.randn(rows, n) * 3).to(dtype), torch.randn(rows, n).to(dtype)
    weight = norm.weight.to(DEVICE)
    first = norm_class is GemmaRMSNorm
    close(ops.rms_norm(x.to(DEVICE), weight, norm.eps, weight_first=first), norm._norm(x))
    out, total = ops.rms_norm(x.to(DEVICE), weight, norm.eps, residual.to(DEVICE), weight_first=first)
    close(total, x + residual)
    close(out, norm._norm(total.cpu()))   # the sum as the kernel rounded it (the interpreter: truncated)


def test_rms_norm_refuses_a_mismatched_weight():
    with pytest.raises(ValueError, match="weight must be 8"):
        ops.rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 48), (4, 1500)])   # 1500: two column blocks, the second partial
def test_silu_and_mul_equals_the_pytorch_formula(dtype, rows, n):
    x = (torch.randn(rows, 2 * n) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    close(ops.silu_and_mul(x.to(DEVICE)), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(16, 16), (64, 48), (80, 80)])
def test_rotary_rotates_strided_views_in_place(dtype, head_dim, rotary_dim):
    """q and k are views of one qkv row (as the attention layers split it): each rotates in place, by its
    token's table row; v and the dims past ``rotary_dim`` stay as they were."""
    heads, kv_heads, tokens = 6, 2, 5
    rope = RotaryEmbedding(head_dim, max_position=64, base=10000.0, rotary_dim=rotary_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    positions = torch.tensor([0, 7, 63, 7, 30])
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    cos, sin = rope.cos_cache[positions].unsqueeze(1), rope.sin_cache[positions].unsqueeze(1)
    expected_q = torch.cat((_rotate(q[..., :rotary_dim], cos, sin), q[..., rotary_dim:]), dim=-1)
    expected_k = torch.cat((_rotate(k[..., :rotary_dim], cos, sin), k[..., rotary_dim:]), dim=-1)
    on = qkv.to(DEVICE)
    gq, gk, gv = on.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    gq, gk = gq.view(tokens, heads, head_dim), gk.view(tokens, kv_heads, head_dim)
    ops.rotary_embedding(positions.to(DEVICE), gq, gk, rope.cos_cache.to(DEVICE), rope.sin_cache.to(DEVICE))
    close(gq, expected_q)
    close(gk, expected_k)
    assert torch.equal(gv.cpu(), qkv[:, (heads + kv_heads) * head_dim:])


def test_rotary_refuses_tables_wider_than_the_heads():
    q = torch.randn(2, 4, 16, device=DEVICE)
    wide = torch.zeros(8, 9, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit heads of 16 dims"):
        ops.rotary_embedding(torch.zeros(2, dtype=torch.int64, device=DEVICE), q, q.clone(), wide, wide)
