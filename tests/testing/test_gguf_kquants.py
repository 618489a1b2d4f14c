"""The test k-quantiser writes blocks ``gguf.dequantize`` reads back close to the weights (each format within
its resolution: 2- and 3-bit codes per sub-block of 16, 4-bit per 32, 5-bit, 6-bit per 16), and picks the
types of llama.cpp's Q4_K_M mix (Q6_K for the output head and for attn_v / ffn_down in the first and last eighth
of the layers and every third in between; the fallbacks where rows do not split into 256-column super-blocks)."""

from __future__ import annotations

import numpy as np
import pytest

from llmserve.testing.gguf_kquants import K_QUANTIZERS, mix_tensor_type

gguf = pytest.importorskip("gguf")

# RMS error relative to the weights' RMS for Gaussian weights: about a step / sqrt(12), a step being a sub-block's
# range (about 5 sigma over 32 values) over 15, 31 or 63 levels (Q6_K: 16 values, symmetric; Q2_K: 16 values
# over 3 levels; Q3_K: 16 values, symmetric, over 6).
RELATIVE_RMS = {"Q2_K": 0.40, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}


@pytest.mark.parametrize("type_name", sorted(K_QUANTIZERS))
def test_blocks_read_back_close_to_the_weights(type_name):
    weights = np.random.default_rng(0).standard_normal((24, 512)).astype(np.float32)
    weights[3] *= 100.0                                   # rows of very different scales keep their own
    raw = K_QUANTIZERS[type_name](weights)
    back = gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    relative = np.sqrt(((back - weights) ** 2).mean(axis=1) / (weights ** 2).mean(axis=1))
    assert relative.max() < RELATIVE_RMS[type_name]
    zeros = K_QUANTIZERS[type_name](np.zeros((1, 256), np.float32))   # no division by a zero scale
    assert not gguf.dequantize(zeros, gguf.GGMLQuantizationType[type_name]).any()


def test_q4_k_m_mix_follows_llama_cpp():
    layers = 8   # more bits: layer 0 (first eighth), 7 (last eighth), 3 and 6 ((i - 1) % 3 == 2)
    v_types = [mix_tensor_type("Q4_K_M", f"blk.{i}.attn_v.weight", layers, 4096) for i in range(layers)]
    assert [i for i, t in enumerate(v_types) if t == "Q6_K"] == [0, 3, 6, 7]
    assert set(v_types) == {"Q4_K", "Q6_K"}
    assert mix_tensor_type("Q4_K_M", "blk.3.ffn_down.weight", layers, 4096) == "Q6_K"
    assert mix_tensor_type("Q4_K_M", "blk.3.attn_q.weight", layers, 4096) == "Q4_K"
    assert mix_tensor_type("Q4_K_M", "output.weight", layers, 4096) == "Q6_K"
    assert mix_tensor_type("Q4_K_M", "blk.1.attn_q.weight", layers, 64) == "Q5_0"    # 64 columns: no super-block
    assert mix_tensor_type("Q4_K_M", "output.weight", layers, 64) == "Q8_0"
    assert mix_tensor_type("Q8_0", "output.weight", layers, 64) == "Q8_0"
