"""GPTQ checkpoints, written as AutoGPTQ / GPTQModel lay them out, run as the dequantised model does.

Weight-only: the codes times the scales are exactly the dequantised checkpoint's weights, so transformers
on that float checkpoint is the oracle to float32 rounding: greedy tokens equal, logprobs within 1e-3
(the tolerance every float32 comparison in the project uses), through the engine with chunked prefill and
prefix-cache hits. Variants: 4 and 8 bits, groups of 32 and one group (-1), symmetric and asymmetric,
v1 (zero - 1) and v2 zero points, ``desc_act`` column orders; q/k/v and gate/up load into fused layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmserve.models.llama import CheckpointMismatchError
from llmserve.quantization.checkpoint_params import CheckpointFormatError
from llmserve.quantization.gptq import GPTQLinearMethod
from tests.engine_greedy import assert_matches_hf, engine_greedy
from tests.model_helpers import load_tiny


@pytest.mark.parametrize("family,options", [
    ("llama", {}),
    ("qwen2", {"desc_act": True, "sym": False}),                          # q/k/v biases, act-order
    ("llama", {"bits": 8, "v2": True, "group_size": -1}),
    ("llama", {"bits": 8, "desc_act": True, "sym": False, "v2": True}),
])
def test_gptq_matches_transformers_on_the_dequantised_checkpoint(quantized, family, options):
    path, reference = quantized("gptq", family, **options)
    assert_matches_hf(engine_greedy(path), reference, 1e-3)


def test_weights_stay_packed_and_desc_act_reorders_columns(quantized):
    path, _ = quantized("gptq", desc_act=True, sym=False)
    model = load_tiny(path)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, GPTQLinearMethod)
    assert not hasattr(qkv, "weight") and not hasattr(qkv, "qweight")
    assert qkv.wq_codes.dtype == torch.uint8 and qkv.wq_codes.shape == (128, 32)   # 64 inputs, two per byte
    assert qkv.wq_perm is not None and sorted(qkv.wq_perm.tolist()) == list(range(64))
    assert model.lm_head.quant_method.__class__.__name__ == "UnquantizedLinearMethod"


def _edit_config(path, tmp_path, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"].update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("changes,message", [
    ({"bits": 3}, "3-bit weights is not supported"),
    ({"group_size": 48}, "group_size 48 is not supported"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"lm_head": True}, "quantised lm_head"),
    ({"dynamic": {"+:.*down_proj": {"bits": 8}}}, r"per-module overrides \(quantization_config.dynamic"),
])
def test_configs_it_cannot_run_are_refused(quantized, tmp_path, changes, message):
    path, _ = quantized("gptq")
    with pytest.raises(CheckpointFormatError, match=message):
        load_tiny(_edit_config(path, tmp_path, **changes))


def test_missing_and_misshapen_tensors_are_named(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = quantized("gptq")
    copy = _edit_config(path, tmp_path)
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.scales"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors: model.layers.0.self_attn.qkv_proj.scales"):
        load_tiny(copy)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.qzeros"] = tensors["model.layers.1.mlp.down_proj.qzeros"][:, :4].contiguous()
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"down_proj.qzeros: .*shape \(4, 4\) but the model expects"):
        load_tiny(copy)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.g_idx"][5] = 2     # 64 inputs in groups of 32: groups 0 and 1
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"o_proj.g_idx names groups outside 0..1"):
        load_tiny(copy)
