"""AWQ gemm checkpoints, written as AutoAWQ lays them out (interleaved nibbles, asymmetric zeros), run as the
dequantised model does: greedy tokens equal to transformers on the dequantised float checkpoint, logprobs
within 1e-3 (weight-only: the same weights to float32 rounding). Other AWQ layouts are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmserve.quantization.awq import AWQ_PACK_ORDER, AWQ_UNPACK_ORDER
from llmserve.quantization.checkpoint_params import CheckpointFormatError, unpack_int32
from tests.engine_greedy import assert_matches_hf, engine_greedy
from tests.model_helpers import load_tiny


def test_awq_matches_transformers_on_the_dequantised_checkpoint(quantized):
    path, reference = quantized("awq", "qwen2")
    assert_matches_hf(engine_greedy(path), reference, 1e-3)


def test_the_nibble_order_is_autoawqs():
    word = sum(v << (4 * i) for i, v in enumerate(AWQ_PACK_ORDER))   # outputs 0..7 packed as AutoAWQ does
    assert unpack_int32(torch.tensor([[word]], dtype=torch.int32), 4, dim=1, order=AWQ_UNPACK_ORDER).tolist() == \
        [list(range(8))]


@pytest.mark.parametrize("changes,message", [({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
                                             ({"version": "marlin"}, "AWQ version 'marlin'"),
                                             ({"zero_point": False}, "zero_point: false"),
                                             ({"bits": 8}, "8-bit")])
def test_other_layouts_are_refused_by_name(quantized, tmp_path, changes, message):
    path, _ = quantized("awq", "qwen2")
    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=message):
        load_tiny(copy)


def test_modules_to_not_convert_stay_float(quantized, tmp_path):
    path, _ = quantized("awq", "qwen2")
    copy = tmp_path / "partial"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["mlp"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing tensors: .*mlp.down_proj.weight"):
        load_tiny(copy)   # the MLPs now want float weights the file does not have
