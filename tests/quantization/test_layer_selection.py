"""Which layers a quantisation config covers, judged by the checkpoint's module names: a fused layer by the
names of the projections fused in it (a listed ``v_proj`` must not cover ``qkv_proj`` because it occurs in that
name), the fused name itself only where the checkpoint stores the fused module (Phi-3's ``qkv_proj``)."""

from __future__ import annotations

import pytest

from llmserve.quantization.checkpoint_params import CheckpointFormatError
from llmserve.quantization.layer_selection import contains_any, covers_all, matches_any

QKV = "model.layers.0.self_attn.qkv_proj"
GATE_UP = "model.layers.0.mlp.gate_up_proj"


@pytest.mark.parametrize("prefix,predicate", [
    (QKV, contains_any(["v_proj"])),                         # transformers' substring rule
    (QKV, matches_any(["re:.*v_proj"])),                     # compressed-tensors' regex rule
    (GATE_UP, contains_any(["up_proj"])),
    (GATE_UP, matches_any(["re:.*up_proj"])),
    (QKV, matches_any(["model.layers.0.self_attn.q_proj"])),
])
def test_a_config_listing_some_projections_of_a_fused_layer_is_refused(prefix, predicate):
    with pytest.raises(CheckpointFormatError, match=f"treats the projections fused in {prefix}"):
        covers_all(prefix, predicate)


@pytest.mark.parametrize("prefix,predicate,covered", [
    (QKV, contains_any(["self_attn"]), True),                # every projection listed
    (QKV, matches_any(["re:.*_proj"]), True),
    (GATE_UP, matches_any(["gate_proj", "up_proj"]), True),
    (QKV, contains_any(["qkv_proj"]), True),                 # a checkpoint that stores the fused module
    (QKV, matches_any(["self_attn.qkv_proj"]), True),
    (QKV, contains_any(["mlp"]), False),
    ("model.layers.0.self_attn.o_proj", contains_any(["o_proj"]), True),
    ("model.layers.0.self_attn.o_proj", matches_any(["re:.*v_proj"]), False),
    ("lm_head", matches_any(["lm_head"]), True),
])
def test_covered_layers(prefix, predicate, covered):
    assert covers_all(prefix, predicate) is covered
