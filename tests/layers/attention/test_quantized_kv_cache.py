"""Attention over a quantised KV cache (int8, float8 e4m3 / e5m2 with per-tensor K and V scales).

Each backend is checked against the PyTorch reference run on the same cache dequantised to float32 (so only
the arithmetic order differs: tight tolerance), and against attention over the unquantised K/V (the
quantisation error itself: a tolerance per format, justified below)."""

from __future__ import annotations

import pytest
import torch

from llmserve.layers.attention.backend import AttentionSpec, triton_available
from llmserve.layers.attention.cpu_backend import CPUAttentionBackend
from llmserve.layers.attention.layer import Attention
from llmserve.layers.attention.torch_backend import TorchAttentionBackend
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.quantization.kv_cache import dequantize_kv, kv_cache_format, quantize_kv
from llmserve.worker.kv_cache_pages import page_bytes
from tests.layers.attention.paged_batch import PagedBatch
from tests.model_helpers import new_kv_cache

# Decodes (short and long contexts), a prefill chunk over cached context and a fresh prompt.
SEQS = [(37, 1), (5, 1), (130, 1), (20, 9), (0, 13)]
NUM_DECODES = 3
# K and V scales: int8's are fitted to the data's range (randn: |x| < ~5); float8 keeps vLLM's default of 1.0
# for K and a non-trivial V scale, so both scales are exercised.
SCALES = {"int8": (5.0 / 127, 4.5 / 127), "fp8_e4m3": (1.0, 0.5), "fp8_e5m2": (1.0, 0.5)}
# Max |error| of the output against attention over unquantised K/V (randn K and V, |v| < ~3). Rounding moves a
# value by at most half a step: 2^-4 of it for e4m3 (3 mantissa bits), 2^-3 for e5m2 (2 bits), half of int8's
# step (4.5 / 127) absolutely; the output mixes values with weights summing to 1, so it moves by at most about
# the largest such error (a short fresh prompt's rows mix few values), and keys' rounding moves the weights by a
# smaller share: 3 * 2^-4 ~ 0.19, 3 * 2^-3 ~ 0.38, 2 * 0.018 + margin.
TOLERANCE = {"int8": 0.05, "fp8_e4m3": 0.2, "fp8_e5m2": 0.4}


def quantised(batch: PagedBatch, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fmt = kv_cache_format(name)
    scales = torch.tensor(SCALES[name])
    return quantize_kv(batch.key_cache, scales[0], fmt), quantize_kv(batch.value_cache, scales[1], fmt), scales


def device_of(backend) -> torch.device:
    """Where a backend runs: Triton on the GPU where there is one (else under the interpreter), the others here."""
    return torch.device("cuda" if backend.name == "triton" and torch.cuda.is_available() else "cpu")


def run(backend, batch: PagedBatch, spec: AttentionSpec, key_cache, value_cache, key, value, kv_scales=None):
    """The backend's output (on the CPU) for the batch's queries over caches already on its device."""
    device = device_of(backend)
    metadata = backend.build_metadata(batch.batch_layout(NUM_DECODES, device), device)
    scales = kv_scales.to(device) if kv_scales is not None else None
    return backend.forward(batch.query.to(device), key.to(device), value.to(device), key_cache, value_cache, metadata,
                           spec, scales).cpu()


def backends(latent: bool = False, dtype: torch.dtype = torch.float32):
    """Every backend that runs here, for a model in ``dtype``: PyTorch, the compiled CPU decode kernel, and the
    Triton kernels (under the interpreter without a GPU; they do not implement latent attention)."""
    yield TorchAttentionBackend(dtype)
    if cpu_kernels() is not None:
        yield CPUAttentionBackend(cpu_kernels(), dtype)
    if triton_available() and not latent:
        from llmserve.layers.attention.triton_backend import TritonAttentionBackend

        yield TritonAttentionBackend(dtype, num_kv_heads=2)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("layer", [{}, {"sliding_window": 24}, {"logits_soft_cap": 5.0}], ids=["full", "window", "cap"])
def test_backends_match_the_reference_on_the_same_quantised_cache(name, layer):
    fmt = kv_cache_format(name)
    batch = PagedBatch(SEQS, 16, 8, 2, 64, seed=3)
    spec = AttentionSpec(8, 2, 64, 64 ** -0.5, kv_cache_dtype=name, **layer)
    plain = run(TorchAttentionBackend(torch.float32), batch, spec, batch.key_cache.clone(),
                batch.value_cache.clone(), batch.key, batch.value)
    k_cache, v_cache, scales = quantised(batch, name)
    # The reference: the unquantised path over the dequantised cache, the new tokens rounded as a write rounds them.
    ref = run(TorchAttentionBackend(torch.float32), batch, spec, dequantize_kv(k_cache, scales[0], torch.float32),
              dequantize_kv(v_cache, scales[1], torch.float32),
              dequantize_kv(quantize_kv(batch.key, scales[0], fmt), scales[0], torch.float32),
              dequantize_kv(quantize_kv(batch.value, scales[1], fmt), scales[1], torch.float32))
    for backend in backends():
        k, v = k_cache.clone().to(device_of(backend)), v_cache.clone().to(device_of(backend))
        out = run(backend, batch, spec, k, v, batch.key, batch.value, scales)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m, name=backend.name: f"{name}: {m}")
        assert (out - plain).abs().max() < TOLERANCE[name], backend.name
        # The step's new tokens were written quantised into their slots.
        slots, k, v = batch.slots, k.cpu(), v.cpu()
        assert torch.equal(k.view(-1, 2, 64)[slots].view(torch.uint8),
                           quantize_kv(batch.key, scales[0], fmt).view(torch.uint8))
        assert torch.equal(v.view(-1, 2, 64)[slots].view(torch.uint8),
                           quantize_kv(batch.value, scales[1], fmt).view(torch.uint8))


def test_one_cache_for_keys_and_values_reads_both_with_the_key_scale():
    """Latent attention (MLA) stores one entry per token, read as key and value: the key's scale serves both."""
    batch = PagedBatch([(21, 1), (0, 6)], 8, 4, 1, 32, seed=5)
    spec = AttentionSpec(4, 1, 32, 0.2, kv_cache_dtype="int8")
    fmt = kv_cache_format("int8")
    scales = torch.tensor([4.0 / 127, 123.0])   # the V scale must go unused
    cache = quantize_kv(batch.key_cache, scales[0], fmt)
    ref_cache = dequantize_kv(cache, scales[0], torch.float32)
    ref_key = dequantize_kv(quantize_kv(batch.key, scales[0], fmt), scales[0], torch.float32)
    metadata = TorchAttentionBackend(torch.float32).build_metadata(batch.batch_layout(1), torch.device("cpu"))
    ref = TorchAttentionBackend(torch.float32).forward(batch.query, ref_key, ref_key, ref_cache, ref_cache, metadata,
                                                       spec)
    for backend in backends(latent=True):
        shared = cache.clone()
        metadata = backend.build_metadata(batch.batch_layout(1), torch.device("cpu"))
        out = backend.forward(batch.query, batch.key, batch.key, shared, shared, metadata, spec, scales)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_layer_allocates_one_byte_entries_and_fits_int8_scales_to_its_first_batch():
    layer = Attention(4, 2, 16, 0.25)
    assert page_bytes(layer, 1, torch.float32) == 2 * 16 * 4   # per token, keys (as many for values)
    layer.set_kv_cache_dtype("int8")
    assert page_bytes(layer, 1, torch.float32) == 2 * 16
    k_cache, v_cache = new_kv_cache(layer, 9, 4, torch.bfloat16)
    assert k_cache.dtype == v_cache.dtype == torch.int8 and k_cache.shape == (9, 4, 2, 16)
    layer.bind_cache(TorchAttentionBackend(torch.float32), k_cache, v_cache)
    assert layer.needs_kv_calibration()
    layer.calibrate_kv_scales = True
    k, v = torch.randn(5, 32), torch.randn(5, 32) * 3
    metadata = layer.backend.build_metadata(PagedBatch([(0, 5)], 4, 4, 2, 16).batch_layout(0), torch.device("cpu"))
    layer(torch.randn(5, 64), k, v, metadata)
    assert layer.kv_scales.tolist() == pytest.approx([2 * k.abs().max().item() / 127, 2 * v.abs().max().item() / 127])
    assert not layer.calibrate_kv_scales   # once
    layer.load_kv_scale("kv_scale", torch.tensor([0.5]))
    assert layer.kv_scales.tolist() == [0.5, 0.5] and not layer.needs_kv_calibration()
    with pytest.raises(ValueError, match="one positive number"):
        layer.load_kv_scale("k_scale", torch.tensor([0.0]))


def test_a_backend_that_cannot_read_the_format_is_refused():
    class FloatOnly(TorchAttentionBackend):
        name = "float-only"
        supports_quantized_kv_cache = False

    layer = Attention(4, 2, 16, 0.25, kv_cache_dtype="fp8")
    with pytest.raises(NotImplementedError, match="float-only attention backend cannot read a fp8_e4m3 KV cache"):
        layer.bind_cache(FloatOnly(torch.float32), *new_kv_cache(layer, 2, 4))
