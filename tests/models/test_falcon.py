"""Falcon: every layout transformers runs (the new decoder architecture with grouped q/k/v, multi-query,
multi-head; parallel attention + MLP under two norms or one, or sequential; rotary or ALiBi) is computed as
transformers computes it, each feature changing the output; tensor-parallel ranks compose to the single-rank
model; the layouts transformers cannot run are refused with a message that says what."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.model_loader.loader import iterate_weights, load_config
from llmserve.models.falcon import FalconForCausalLM
from llmserve.models.llama import UnsupportedModelConfigError
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, with_config


def one_parallel_norm(path: Path) -> None:
    """A layer with one norm for attention and MLP: ``input_layernorm`` (Falcon-40B's ``ln_attn`` renamed, its
    ``ln_mlp`` dropped; Falcon-RW's ``post_attention_layernorm`` dropped)."""
    tensors = load_file(str(path / "model.safetensors"))
    tensors = {n.replace(".ln_attn.", ".input_layernorm."): t for n, t in tensors.items()
               if ".ln_mlp." not in n and ".post_attention_layernorm." not in n}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# name -> (family, config changes, whether the layer keeps one parallel norm)
VARIANTS = {
    "new-arch-as-written": ("falcon", {}, False),   # GQA 6 / 2, ln_attn + ln_mlp, rotary
    "new-arch-one-norm": ("falcon", {"num_ln_in_parallel_attn": 1}, True),
    "new-arch-alibi": ("falcon", {"alibi": True}, False),
    "new-arch-other-rope-base": ("falcon", {"rope_theta": 100.0, "rope_parameters": {"rope_type": "default",
                                                                                  "rope_theta": 100.0}}, False),
    "multi-query-as-written": ("falcon_mqa", {}, False),   # one KV head, one norm, untied
    "multi-query-alibi": ("falcon_mqa", {"alibi": True}, False),
    "multi-query-relu": ("falcon_mqa", {"activation": "relu"}, False),
    "rw-as-written": ("falcon_rw", {}, False),   # ALiBi, multi-head, sequential, biases
    "rw-parallel": ("falcon_rw", {"parallel_attn": True}, True),
    "rw-rotary": ("falcon_rw", {"alibi": False}, False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf_and_each_feature_changes_them(checkpoint_dir, tmp_path, name):
    family, changes, one_norm = VARIANTS[name]
    base = checkpoint_dir(family)
    path = with_config(tmp_path, base, changes) if changes else base
    if one_norm:
        one_parallel_norm(path)
    assert_matches_hf(path, base if changes else None)


def test_layouts_restack_query_key_value_and_pick_their_norms(checkpoint_dir):
    """The fused tensor's groups land as [q; k; v] in the shared linear; each layout gets its norms."""
    path = checkpoint_dir("falcon")
    tensors = load_file(str(path / "model.safetensors"))
    model = FalconForCausalLM(load_config(path))
    model.load_weights(iterate_weights(path))   # before the CPU kernels re-block the weights
    layer = model.model.layers[1]
    fused = tensors["transformer.h.1.self_attention.query_key_value.weight"].view(2, 5, 16, 96)   # 2 groups of 3 + 2
    qkv = layer.self_attn.qkv_proj.weight.detach()
    assert torch.equal(qkv[:96], fused[:, :3].reshape(96, 96))
    assert torch.equal(qkv[96:128], fused[:, 3].reshape(32, 96)) and torch.equal(qkv[128:], fused[:, 4].reshape(32, 96))
    assert layer.mlp_layernorm is not None and layer.post_attention_layernorm is None
    rw = load_tiny(checkpoint_dir("falcon_rw")).model.layers[0]
    assert rw.mlp_layernorm is None and rw.post_attention_layernorm is not None
    assert rw.self_attn.attn.spec.alibi_slopes is not None and rw.self_attn.rotary_emb is None


@pytest.mark.parametrize("family", ["falcon", "falcon_mqa", "falcon_rw"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, family):
    """Over 2 ranks: 3 query heads and 1 of the 2 KV groups each (new architecture), 2 query heads and the one
    KV head replicated (multi-query), 3 heads with their own ALiBi slopes (RW)."""
    path = checkpoint_dir(family)
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,changes,message", [
    ("falcon", {"parallel_attn": False}, "new_decoder_architecture with parallel_attn=false"),
    ("falcon", {"num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn=3 is not supported"),
    ("falcon_mqa", {"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn=2 needs new_decoder_architecture"),
    ("falcon_rw", {"num_kv_heads": 2}, "num_kv_heads=2 with multi_query=false"),
    ("falcon_mqa", {"activation": "gelu_10"}, "unsupported activation 'gelu_10'"),
])
def test_layouts_transformers_cannot_run_are_refused(checkpoint_dir, tmp_path, family, changes, message):
    with pytest.raises((UnsupportedModelConfigError, ValueError), match=message):
        load_tiny(with_config(tmp_path, checkpoint_dir(family), changes))
