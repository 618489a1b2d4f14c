"""GGUF's linear method: which layers it takes, how it loads rows of blocks, what it computes.

* A layer runs packed only when every projection fused in it is packed in the file (a float ``v_proj`` keeps the
  whole qkv layer on the dequantised path, and the loader is told so); architectures outside the list and files
  with no packed tensor get no config; a family naming its layers otherwise (BLOOM) packs them under the
  model's names.
* A fused layer loads each projection's rows in its own type (Q4_K beside Q6_K, as a Q4_K_M file has them) and
  multiplies as the float64 product of the rounded activations and ``gguf.dequantize`` of the blocks.
* Rows of the wrong width for their type, or never given a type, are refused.
* On CUDA the layer keeps the weight-only layout with offsets instead, holding exactly the file's weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.layers.linear import QKVParallelLinear, RowParallelLinear, WeightShapeError
from llmserve.quantization.gguf import GGUFConfig, GGUFLinearMethod, gguf_quantization_config, set_gguf_weight_only
from llmserve.quantization.gguf_blocks import decode_rows
from llmserve.quantization.group_int8 import quantize_activations
from llmserve.quantization.packed import U4, U8, dequantize_weight_only
from llmserve.testing.gguf_kquants import quantize_tensor

gguf = pytest.importorskip("gguf")

PREFIX = "model.layers.0.self_attn"


def _qkv(config: GGUFConfig) -> QKVParallelLinear:
    return QKVParallelLinear(256, 32, 4, 2, bias=True, quant_config=config, prefix=f"{PREFIX}.qkv_proj")


def test_a_layer_is_packed_only_when_all_its_projections_are():
    packed = GGUFConfig({f"{PREFIX}.{p}.weight": "Q4_K" for p in ("q_proj", "k_proj", "v_proj")})
    assert isinstance(_qkv(packed).quant_method, GGUFLinearMethod)
    assert packed.packs(f"{PREFIX}.v_proj.weight") and not packed.packs(f"{PREFIX}.v_proj.bias")
    mixed = GGUFConfig({f"{PREFIX}.{p}.weight": "Q4_K" for p in ("q_proj", "k_proj")})
    assert not isinstance(_qkv(mixed).quant_method, GGUFLinearMethod)
    assert not mixed.packs(f"{PREFIX}.q_proj.weight")


def test_only_the_listed_architectures_with_packed_tensors_get_a_config():
    types = {"model.layers.0.mlp.down_proj.weight": "Q8_0", "model.embed_tokens.weight": "Q8_0"}
    assert gguf_quantization_config(types, "qwen2") is not None
    assert gguf_quantization_config(types, "mamba") is None
    assert gguf_quantization_config({"model.layers.0.mlp.down_proj.weight": "F16"}, "llama") is None


def test_a_family_naming_its_layers_otherwise_packs_them_under_the_models_names():
    """BLOOM's checkpoint names its fused qkv ``transformer.h.N.self_attention.query_key_value``; the model's
    layer is ``model.layers.N.self_attn.qkv_proj``."""
    from llmserve.models.bloom import BloomForCausalLM

    fused = "transformer.h.0.self_attention.query_key_value.weight"
    config = gguf_quantization_config({fused: "Q8_0"}, "bloom", rename=BloomForCausalLM.checkpoint_name)
    assert isinstance(_qkv(config).quant_method, GGUFLinearMethod)
    assert config.packs(fused) and not config.packs(fused.replace(".weight", ".bias"))
    assert not config.packs("transformer.h.1.self_attention.query_key_value.weight")


def _type_rows(rows: int, type_name: str) -> torch.Tensor:
    return torch.full((rows,), int(gguf.GGMLQuantizationType[type_name]), dtype=torch.uint8)


def test_a_fused_layer_loads_each_projection_in_its_own_type():
    layer = _qkv(GGUFConfig({f"{PREFIX}.{p}.weight": "Q4_K" for p in ("q_proj", "k_proj", "v_proj")}))
    rng = np.random.default_rng(0)
    weights, blocks = [], []
    for shard, rows, type_name in (("q", 128, "Q4_K"), ("k", 64, "Q4_K"), ("v", 64, "Q6_K")):
        raw = quantize_tensor(rng.standard_normal((rows, 256)).astype(np.float32), type_name)
        layer.qweight_type.weight_loader(layer.qweight_type, _type_rows(rows, type_name), shard)
        layer.qweight.weight_loader(layer.qweight, torch.from_numpy(raw), shard)
        weights.append(gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name]))
        blocks.append(raw)
    layer.bias.data.copy_(torch.randn(256))
    layer.process_weights_after_loading()
    assert [s.bits for s in layer.group_int8_segments] == [4, 6]   # Q4_K rows, then the Q6_K rows
    x = torch.randn(3, 256)
    q, scale = quantize_activations(x)
    rounded = (q.double().view(3, -1, 32) * scale.double().unsqueeze(-1)).view(3, 256)
    expected = rounded @ torch.from_numpy(np.concatenate(weights)).double().T + layer.bias.double()
    out = layer(x)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    fresh = _qkv(GGUFConfig({f"{PREFIX}.{p}.weight": "Q4_K" for p in ("q_proj", "k_proj", "v_proj")}))
    fresh.qweight_type.weight_loader(fresh.qweight_type, _type_rows(64, "Q4_K"), "v")
    with pytest.raises(WeightShapeError, match="qweight"):   # Q6_K rows are wider than Q4_K ones
        fresh.qweight.weight_loader(fresh.qweight, torch.from_numpy(blocks[2]), "v")


def test_rows_never_given_a_type_are_refused():
    layer = RowParallelLinear(256, 16, quant_config=GGUFConfig({"o_proj.weight": "Q8_0"}), prefix="o_proj")
    raw = quantize_tensor(np.ones((16, 256), np.float32), "Q8_0")
    with pytest.raises(WeightShapeError, match="o_proj.qweight"):
        layer.qweight.weight_loader(layer.qweight, torch.from_numpy(raw))


def _runs(*types: tuple[int, str], k: int = 512, seed: int = 0):
    """Row runs of random weights in each ``(rows, type)``, decoded, with ``gguf.dequantize``'s values for them."""
    rng = np.random.default_rng(seed)
    runs, expected = [], []
    for rows, type_name in types:
        raw = quantize_tensor(rng.standard_normal((rows, k)).astype(np.float32), type_name)
        runs.append(decode_rows(raw, type_name, k))
        expected.append(gguf.dequantize(raw, gguf.GGMLQuantizationType[type_name]))
    return runs, np.concatenate(expected)


@pytest.mark.parametrize("types,code_format,group", [
    (((24, "Q4_K"),), U4, 32), (((8, "Q2_K"), (8, "Q3_K")), U4, 16), (((16, "Q4_0"), (8, "Q4_1")), U4, 32),
    (((8, "Q3_K"), (16, "Q4_K")), U4, 16),   # 4-bit codes of two group widths: Q4_K's scales repeated
    (((24, "Q8_0"),), U8, 32), (((8, "Q5_1"), (8, "Q5_0"), (8, "Q5_K")), U8, 32),
    (((16, "Q4_K"), (8, "Q6_K")), U8, 16),   # a Q4_K_M qkv layer: byte codes, Q6_K's 16-column groups
])
def test_the_cuda_layout_holds_exactly_the_files_weights(types, code_format, group):
    """On CUDA a packed layer keeps the weight-only layout with offsets: 4-bit codes when every row's fit,
    groups of the narrowest run's width; its weight is ``gguf.dequantize``'s bit for bit."""
    runs, expected = _runs(*types)
    layer = torch.nn.Module()
    set_gguf_weight_only(layer, runs, torch.device("cpu"))
    assert (layer.wq_format, layer.wq_group, layer.wq_zeros) == (code_format, group, None)
    np.testing.assert_array_equal(dequantize_weight_only(layer).numpy(), expected)
