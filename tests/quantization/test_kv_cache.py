"""The quantised KV cache's formats: names, the reference quantise/dequantise, and the compiled CPU kernel's
in-register conversion of every byte against torch's own float8 and int8 casts."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.quantization.kv_cache import (CALIBRATION_HEADROOM, FORMATS, check_kv_cache_dtype, dequantize_kv,
                                            format_of, kv_cache_format, quantize_kv, scale_for)

FORMAT_NAMES = ["fp8_e4m3", "fp8_e5m2", "int8"]


def test_names_are_vllms_and_fp8_means_e4m3():
    assert [check_kv_cache_dtype(n) for n in ("auto", "fp8", "FP8_E4M3", "fp8_e5m2", "int8")] == [
        "auto", "fp8_e4m3", "fp8_e4m3", "fp8_e5m2", "int8"]
    assert kv_cache_format("auto") is None
    assert kv_cache_format("fp8_e4m3").dtype == torch.float8_e4m3fn
    assert kv_cache_format("fp8_e5m2").dtype == torch.float8_e5m2
    for bad in ("fp16", "float8", "int4", ""):
        with pytest.raises(ValueError, match="--kv-cache-dtype"):
            check_kv_cache_dtype(bad)


def test_fp8_is_refused_on_a_torch_without_float8(monkeypatch):
    monkeypatch.delitem(FORMATS, "fp8_e4m3")
    with pytest.raises(RuntimeError, match="no float8 dtypes"):
        check_kv_cache_dtype("fp8")
    assert check_kv_cache_dtype("int8") == "int8"


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_quantize_rounds_like_torchs_cast_and_saturates(name):
    fmt = kv_cache_format(name)
    x = torch.randn(4096) * fmt.max_value / 4
    scale = torch.tensor(0.5)
    q = quantize_kv(x, scale, fmt)
    assert q.dtype == fmt.dtype
    inside = (x / scale).abs() <= fmt.max_value
    expected = (x / scale).round() if name == "int8" else x / scale
    assert torch.equal(q[inside].view(torch.uint8), expected[inside].to(fmt.dtype).view(torch.uint8))
    # Beyond the range: the largest finite value, never inf / NaN / a wrapped integer.
    big = quantize_kv(torch.tensor([1e9, -1e9]), torch.tensor(1.0), fmt).float()
    assert big.tolist() == [fmt.max_value, -fmt.max_value]
    assert torch.equal(dequantize_kv(q, scale, torch.float32), q.float() * 0.5)


def test_calibrated_scale_leaves_headroom_over_the_largest_magnitude():
    fmt = kv_cache_format("int8")
    x = torch.tensor([0.5, -2.54, 1.0])
    assert CALIBRATION_HEADROOM == 2.0
    assert scale_for(x, fmt).item() == pytest.approx(2 * 2.54 / 127)
    assert quantize_kv(x, scale_for(x, fmt), fmt).tolist() == [12, -64, 25]   # 12.5 rounds to even
    assert quantize_kv(x * 2, scale_for(x, fmt), fmt).tolist() == [25, -127, 50]   # twice as large: still in range
    assert scale_for(torch.zeros(3), fmt).item() == 1.0


def test_a_cache_tells_its_format_by_its_dtype():
    assert format_of(torch.zeros(2, dtype=torch.float8_e5m2)).name == "fp8_e5m2"
    assert format_of(torch.zeros(2, dtype=torch.int8)).name == "int8"
    assert format_of(torch.zeros(2)) is None


def every_finite_byte(fmt) -> torch.Tensor:
    """All 256 codes of ``fmt`` as its dtype, the non-finite ones (never written: writes saturate) as zero."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes.view(torch.int8) if fmt.dtype == torch.int8 else codes.view(fmt.dtype)
    return torch.where(codes.float().isfinite(), codes, torch.zeros_like(codes))


@pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels need a C compiler")
@pytest.mark.parametrize("head_dim", [256, 257], ids=["vector", "scalar"])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_cpu_kernel_reads_every_code_exactly(name, head_dim):
    """A one-token context: softmax weight 1, so the output is the value row itself, as the kernel converted
    it (times v_scale, a power of two: exact). Both the AVX-512 / vector path and the scalar one."""
    fmt = kv_cache_format(name)
    values = torch.zeros(head_dim, dtype=fmt.dtype)
    values[:256] = every_finite_byte(fmt)
    value_cache = values.view(1, 1, 1, head_dim)
    key_cache = torch.zeros_like(value_cache)
    out = torch.empty(1, 1, head_dim)
    cpu_kernels().paged_decode_attention(torch.randn(1, 1, head_dim), key_cache, value_cache,
                                         torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                                         0.1, out, kv_scales=(3.0, 0.25))
    assert torch.equal(out.view(-1), values.float() * 0.25)


@pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels need a C compiler")
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_cpu_kernel_scores_every_key_code_exactly(name):
    """Two keys: the kernel's score difference is q . (k1 - k0) * scale * k_scale, so with q a one-hot vector the
    softmax weight of key 1 gives back the dequantised code at that position."""
    fmt = kv_cache_format(name)
    codes = every_finite_byte(fmt)
    codes = codes[codes.float().abs() <= 16]   # exp() stays well inside float32
    key_cache = torch.zeros(1, 2, 1, 16, dtype=fmt.dtype)
    value_cache = torch.zeros_like(key_cache)
    value_cache[0, 1, 0, 0] = torch.ones(1).to(fmt.dtype)[0]   # out[0] = softmax weight of key 1
    out = torch.empty(1, 1, 16)
    for code in codes:
        key_cache[0, 1, 0, 3] = code
        q = torch.zeros(1, 1, 16)
        q[0, 0, 3] = 1.0
        cpu_kernels().paged_decode_attention(q, key_cache, value_cache, torch.zeros(1, 1, dtype=torch.int32),
                                             torch.full((1,), 2, dtype=torch.int32), 1.0, out, kv_scales=(0.5, 1.0))
        expected = torch.sigmoid(code.float() * 0.5)
        assert out[0, 0, 0].item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7), code
