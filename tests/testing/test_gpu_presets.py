"""The GPU benchmark checkpoint shapes match the real models they stand in for, parameter for parameter."""

from __future__ import annotations

import math

from llmserve.testing.checkpoints import SIZES, tensor_specs


def _params(family: str, size: str) -> int:
    return sum(math.prod(spec.shape) for spec in tensor_specs(family, size))


def test_8b_preset_is_llama3_8b_shaped():
    assert _params("llama", "8b") == 8_030_261_248   # Meta-Llama-3-8B
    sz = SIZES["8b"]
    assert (sz.hidden_size // sz.num_attention_heads, sz.num_key_value_heads, sz.vocab_size) == (128, 8, 128256)


def test_1b_preset_is_llama32_1b_shaped():
    assert _params("llama3", "1b") == 1_235_814_400   # Llama-3.2-1B (tied embeddings)
