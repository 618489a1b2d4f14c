"""AttentionSpec: what a layer hands the backend (validated, plain and hashable), and the Attention layer
building it and passing it on every forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmserve.layers.attention.backend import AttentionBackend, AttentionSpec, BatchLayout
from llmserve.layers.attention.layer import Attention


def test_spec_defaults_are_full_attention_without_cap():
    spec = AttentionSpec(8, 2, 64, 0.125)
    assert (spec.sliding_window, spec.logits_soft_cap, spec.kv_cache_dtype) == (None, None, "auto")
    assert spec.group == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.scale = 1.0
    # Plain fields: hashable (backends may key per-step caches on them) and serialisable.
    assert hash(spec) == hash(AttentionSpec(8, 2, 64, 0.125))
    assert dataclasses.asdict(AttentionSpec(8, 2, 64, 0.125, sliding_window=4096, logits_soft_cap=50)) == {
        "num_heads": 8, "num_kv_heads": 2, "head_dim": 64, "scale": 0.125, "sliding_window": 4096,
        "logits_soft_cap": 50.0, "alibi_slopes": None, "kv_cache_dtype": "auto"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=6, num_kv_heads=4), "must be a multiple of num_key_value_heads"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=-3), "sliding_window"),
    (dict(sliding_window=2.5), "sliding_window"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap"),
    (dict(logits_soft_cap=-30.0), "logits_soft_cap"),
])
def test_spec_refuses_bad_values(kwargs, match):
    args = dict(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25) | kwargs
    with pytest.raises(ValueError, match=match):
        AttentionSpec(**args)


def test_kv_cache_dtype_is_the_model_dtype_or_a_quantised_format():
    # The model dtype is torch's default dtype while the model is built (the loader sets it).
    assert AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype=None).kv_cache_dtype == "auto"
    assert AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype="auto").kv_cache_dtype == "auto"
    assert AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype=torch.float32).kv_cache_dtype == "float32"
    assert AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype="float32").kv_cache_dtype == "float32"
    # The quantised formats of --kv-cache-dtype ("fp8" is e4m3, as in vLLM).
    for value, name in [("fp8", "fp8_e4m3"), ("FP8_E4M3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("int8", "int8")]:
        spec = AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype=value)
        assert spec.kv_cache_dtype == name and spec.kv_format.name == name
    assert AttentionSpec(4, 2, 16, 0.25).kv_format is None
    for value, name in [(torch.bfloat16, "torch.bfloat16"), ("float16", "'float16'"),
                        (torch.float8_e4m3fn, "torch.float8_e4m3fn")]:
        with pytest.raises(NotImplementedError, match=f"kv_cache_dtype={name}"):
            AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype=value)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype=torch.bfloat16).kv_cache_dtype == "bfloat16"
        assert AttentionSpec(4, 2, 16, 0.25, kv_cache_dtype="bf16").kv_cache_dtype == "bfloat16"
        with pytest.raises(NotImplementedError, match="float32"):
            Attention(4, 2, 16, 0.25, kv_cache_dtype=torch.float32)
    finally:
        torch.set_default_dtype(previous)


class RecordingBackend(AttentionBackend):
    name = "recording"

    def __init__(self):
        self.specs = []

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> object:
        return None

    def forward(self, query, key, value, key_cache, value_cache, metadata, spec, kv_scales=None):
        self.specs.append(spec)
        return torch.zeros_like(query)


def test_layer_builds_its_spec_and_hands_it_to_the_backend():
    plain = Attention(4, 2, 16, 0.25)   # the positional signature models use
    assert plain.spec == AttentionSpec(4, 2, 16, 0.25)
    assert (plain.num_heads, plain.num_kv_heads, plain.head_dim, plain.scale) == (4, 2, 16, 0.25)
    sliding = Attention(4, 2, 16, 0.25, sliding_window=4096, logits_soft_cap=50.0, kv_cache_dtype="auto")
    assert sliding.spec == AttentionSpec(4, 2, 16, 0.25, sliding_window=4096, logits_soft_cap=50.0)
    assert "sliding_window=4096" in repr(sliding) and "logits_soft_cap=50.0" in repr(sliding)
    backend = RecordingBackend()
    for layer in (plain, sliding):
        layer.bind_cache(backend, torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16))
        out = layer(torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 32), None)
        assert out.shape == (3, 64)
    assert backend.specs == [plain.spec, sliding.spec]
    with pytest.raises(ValueError, match="must be a multiple"):
        Attention(6, 4, 16, 0.25)


def test_a_layer_refuses_a_cache_of_another_dtype_than_it_asked_for():
    layer = Attention(4, 2, 16, 0.25, kv_cache_dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="float32"):
        layer.bind_cache(RecordingBackend(), torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16),
                         torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16))
    layer.bind_cache(RecordingBackend(), torch.empty(0), torch.empty(0))   # unbinding (profiling) is fine
