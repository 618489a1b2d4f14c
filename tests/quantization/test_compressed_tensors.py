"""compressed-tensors checkpoints, written as llm-compressor lays them out.

* W4A16 ``pack-quantized`` is weight-only: greedy tokens equal to transformers on the dequantised float
  checkpoint, logprobs within 1e-3; its packing equals the ``compressed-tensors`` package's own, and
  transformers with that package decompresses every generated file (all four schemes) to the twin's weights.
* W8A8 int8 and FP8 quantise activations too, which the dequantised float model does not: the oracle is the
  PyTorch reference of the same arithmetic (:mod:`llmserve.quantization.packed` with the kernels off),
  logprobs within 1e-3. Against transformers on the dequantised weights (float activations), every logit
  within the format's activation rounding (int8: 0.5, float8 e4m3 with 3 mantissa bits: 1.5, on these
  random-weight models whose logits spread over about +-10) and greedy picks agreeing on at least 90% of
  the positions (the others are near-ties the rounding flips).
* An unsupported scheme is refused, naming it; ``ignore`` leaves a layer in float.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.quantization import packed
from llmserve.quantization.checkpoint_params import CheckpointFormatError
from llmserve.quantization.compressed_tensors import CTFP8Method, CTPackedMethod, CTW8A8Method
from tests.engine_greedy import assert_matches_hf, engine_greedy
from tests.hf_reference import hf_model
from tests.model_helpers import PROMPT, load_tiny, prefill_logits

LONG_PROMPT = PROMPT + list(range(100, 140))


def test_w4a16_matches_transformers_on_the_dequantised_checkpoint(quantized):
    path, reference = quantized("ct-w4a16", "qwen2")
    assert_matches_hf(engine_greedy(path), reference, 1e-3)
    assert isinstance(load_tiny(path).model.layers[0].mlp.gate_up_proj.quant_method, CTPackedMethod)


def test_w4a16_packing_is_the_compressed_tensors_packages(quantized):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    path, reference = quantized("ct-w4a16")
    tensors, weights = load_file(path / "model.safetensors"), load_file(reference / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    scale = tensors[f"{name}.weight_scale"].float().repeat_interleave(32, dim=1)
    codes = torch.round(weights[f"{name}.weight"] / scale).to(torch.int8)
    assert torch.equal(helpers.pack_to_int32(codes, 4), tensors[f"{name}.weight_packed"])
    unpacked = helpers.unpack_from_int32(tensors[f"{name}.weight_packed"], 4, tensors[f"{name}.weight_shape"])
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("fmt", ["ct-w4a16", "ct-w8a8", "ct-fp8-dynamic", "ct-fp8-static"])
def test_transformers_with_compressed_tensors_decompresses_the_files_to_the_twin(quantized, fmt):
    """The real library reads what the packer wrote: its dequantised weights are the twin's, up to its
    half-precision arithmetic (a relative 2^-10)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path, reference = quantized(fmt)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    state, twin = model.state_dict(), load_file(reference / "model.safetensors")
    projections = [name for name in twin if name.endswith("_proj.weight")]
    assert len(projections) == 14
    for name in projections:
        torch.testing.assert_close(state[name].float(), twin[name], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("fmt,method,tolerance", [("ct-w8a8", CTW8A8Method, 0.5), ("ct-fp8-dynamic", CTFP8Method, 1.5),
                                                  ("ct-fp8-static", CTFP8Method, 1.5)])
def test_activation_quantised_schemes_match_their_reference_arithmetic(quantized, monkeypatch, fmt, method,
                                                                       tolerance):
    path, reference = quantized(fmt)
    model = load_tiny(path)
    assert isinstance(model.model.layers[0].self_attn.o_proj.quant_method, method)
    ours = prefill_logits(model, LONG_PROMPT).log_softmax(-1)
    monkeypatch.setattr(packed, "kernels_for", lambda t: None)
    torch.testing.assert_close(ours, prefill_logits(model, LONG_PROMPT).log_softmax(-1), atol=1e-3, rtol=0)
    with torch.inference_mode():
        hf = hf_model(str(reference))(torch.tensor([LONG_PROMPT])).logits[0].float()
    logits = prefill_logits(model, LONG_PROMPT)
    assert (logits - hf).abs().max() < tolerance
    assert (logits.argmax(-1) == hf.argmax(-1)).float().mean() >= 0.9


def _with_config(path, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config["quantization_config"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_unsupported_schemes_are_refused_naming_them(quantized, tmp_path):
    path, _ = quantized("ct-w8a8")

    def asymmetric(qc):
        qc["config_groups"]["group_0"]["input_activations"]["symmetric"] = False
    with pytest.raises(CheckpointFormatError, match=r"weights int8 channel, activations int8 token dynamic asymmetric"):
        load_tiny(_with_config(path, tmp_path, asymmetric))

    def nvfp4(qc):
        qc["config_groups"]["group_0"].update(format="nvfp4-pack-quantized",
                                              weights={"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                       "group_size": 16})
    with pytest.raises(CheckpointFormatError, match=r"weights float4 tensor_group.*format nvfp4-pack-quantized"):
        load_tiny(_with_config(path, tmp_path / "b", nvfp4))

    w4a16, _ = quantized("ct-w4a16")

    def group_act_order(qc):   # llm-compressor then stores a weight_g_idx per layer
        qc["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    with pytest.raises(CheckpointFormatError, match=r"weights int4 group group 32 actorder group"):
        load_tiny(_with_config(w4a16, tmp_path / "c", group_act_order))

    def no_group_size(qc):
        qc["config_groups"]["group_0"]["weights"]["group_size"] = None
    with pytest.raises(CheckpointFormatError, match=r"weights int4 group group None"):
        load_tiny(_with_config(w4a16, tmp_path / "d", no_group_size))

    def int8_kv_cache(qc):
        qc["kv_cache_scheme"] = {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False,
                                 "symmetric": True}
    with pytest.raises(CheckpointFormatError, match=r"kv_cache_scheme \(int8 tensor\) is not supported"):
        load_tiny(_with_config(path, tmp_path / "e", int8_kv_cache))


def test_a_group_that_names_a_layer_wins_over_one_that_targets_every_linear(quantized, tmp_path):
    """Whatever the order of config_groups (vLLM and compressed-tensors match names before the class)."""
    w8a8, _ = quantized("ct-w8a8")
    w4a16, _ = quantized("ct-w4a16")
    tensors = {k: v for k, v in load_file(w8a8 / "model.safetensors").items() if ".down_proj." not in k}
    tensors.update({k: v for k, v in load_file(w4a16 / "model.safetensors").items() if ".down_proj." in k})
    every_linear = {**json.loads((w8a8 / "config.json").read_text())["quantization_config"]["config_groups"]
                    ["group_0"], "targets": ["Linear"]}
    down = {**json.loads((w4a16 / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"],
            "targets": ["re:.*down_proj$"]}
    for i, groups in enumerate(({"group_0": every_linear, "group_1": down},
                                {"group_0": down, "group_1": every_linear})):
        def mixed(qc, groups=groups):
            qc.update(config_groups=groups, format="mixed-precision")
        path = _with_config(w8a8, tmp_path / str(i), mixed)
        save_file(tensors, path / "model.safetensors")
        layer = load_tiny(path).model.layers[0]
        assert isinstance(layer.mlp.down_proj.quant_method, CTPackedMethod)
        assert isinstance(layer.mlp.gate_up_proj.quant_method, CTW8A8Method)


def test_an_fp8_kv_cache_scheme_is_accepted_with_its_scales(quantized, tmp_path):
    """llm-compressor writes calibrated k/v scales together with kv_cache_scheme; they are read for an fp8 cache."""
    path, _ = quantized("ct-fp8-dynamic")

    def fp8_kv_cache(qc):
        qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                 "symmetric": True}
    copy = _with_config(path, tmp_path, fp8_kv_cache)
    tensors = load_file(copy / "model.safetensors")
    for name in [k for k in tensors if k.endswith("self_attn.q_proj.weight")]:
        tensors[name.replace("q_proj.weight", "k_scale")] = torch.tensor([0.25])
        tensors[name.replace("q_proj.weight", "v_scale")] = torch.tensor([0.5])
    save_file(tensors, copy / "model.safetensors")
    attn = load_tiny(copy).model.layers[0].self_attn.attn
    assert attn.kv_scales.tolist() == [0.25, 0.5]


def test_ignored_layers_stay_float(quantized, tmp_path):
    path, _ = quantized("ct-w8a8")

    def ignore_mlp(qc):
        qc["ignore"] = ["lm_head", "re:.*mlp\\..*"]
    with pytest.raises(ValueError, match=r"unexpected tensors: model.layers.0.mlp.down_proj.weight_scale"):
        load_tiny(_with_config(path, tmp_path, ignore_mlp))   # float MLPs: the file's scales have nowhere to go

    def split_qkv(qc):
        qc["ignore"] = ["lm_head", "re:.*q_proj"]
    with pytest.raises(CheckpointFormatError, match="treats the projections fused in model.layers.0.self_attn.qkv"):
        load_tiny(_with_config(path, tmp_path / "b", split_qkv))
