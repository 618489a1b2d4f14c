"""GGUF blocks decode into codes, scales and offsets that stand for exactly what ``gguf.dequantize`` reads.

For every packed type, rows written by the ``gguf`` package (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or by the test
k-quantiser (Q2_K to Q6_K): ``s * q + m`` in float32, before and after the kernel's repacking, equals
``gguf.dequantize`` value for value (``==``: a zero may come out as +0 where gguf gives -0). A row of the wrong
width is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.quantization.gguf_blocks import PACKED_TYPES, decode_rows, row_bytes
from llmserve.quantization.group_int8 import GroupInt8Segment
from llmserve.testing.gguf_kquants import quantize_tensor

gguf = pytest.importorskip("gguf")


def _weights(rows: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 3.0, (rows, 1)).astype(np.float32)
    weights[0, :64] = 0.0                                  # an all-zero block
    weights[1, 32:64] = 5.0                                # a constant block
    return weights


@pytest.mark.parametrize("type_name", PACKED_TYPES)
def test_decoded_blocks_equal_gguf_dequantize(type_name):
    rows, k = 19, 512
    raw = quantize_tensor(_weights(rows, k, len(type_name)), type_name)
    assert raw.shape == (rows, row_bytes(type_name, k))
    expected = gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    decoded = decode_rows(raw, type_name, k)
    assert decoded.codes.max() < 1 << decoded.bits
    np.testing.assert_array_equal(decoded.dequantize(), expected)
    assert torch.equal(GroupInt8Segment(decoded).dequantize(), torch.from_numpy(expected))


def test_rows_of_the_wrong_width_are_refused():
    raw = quantize_tensor(_weights(4, 256, 0), "Q4_K")
    with pytest.raises(ValueError, match="Q4_K: 4 rows of 512 columns"):
        decode_rows(raw, "Q4_K", 512)
    with pytest.raises(ValueError, match="multiple of 256"):
        row_bytes("Q6_K", 96)


# bytes a packed row of 256 columns holds (codes, fp16 scales per block, integer factors per group), beside the
# file's: the 32-column formats in 4 bits or 8 and Q6_K take exactly the file's bytes, the others at most 2x
# (their 2-, 3- and 5-bit codes stored in 4 bits or 6)
PACKED_BYTES = {"Q8_0": (272, 272), "Q4_0": (144, 144), "Q4_1": (160, 160), "Q5_0": (208, 176), "Q5_1": (224, 192),
                "Q2_K": (164, 84), "Q3_K": (146, 110), "Q4_K": (148, 144), "Q5_K": (212, 176), "Q6_K": (210, 210)}


@pytest.mark.parametrize("type_name", PACKED_TYPES)
def test_a_packed_weight_holds_about_the_files_bytes(type_name):
    rows, k = 32, 512
    segment = GroupInt8Segment(decode_rows(quantize_tensor(_weights(rows, k, 1), type_name), type_name, k))
    held = sum(t.numel() * t.element_size() for t in segment.buffers())
    packed, in_file = PACKED_BYTES[type_name]
    assert held == rows * k // 256 * packed
    assert row_bytes(type_name, 256) == in_file
