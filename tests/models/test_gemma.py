"""Gemma 2 and 3: every feature is computed as transformers computes it, and each one changes the output (so the
engine-level HF-equivalence tests would catch an engine that got it wrong or ignored it); the multimodal Gemma 3
checkpoint serves its language model; what llmserve cannot run is refused with a message that says what."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.model_loader.loader import load_config
from llmserve.models.llama import UnsupportedModelConfigError
from llmserve.models.registry import UnsupportedArchitectureError, resolve_model_class
from llmserve.testing.checkpoints import write_checkpoint
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, hf_logits, with_config

GEMMA3_LOCAL_ROPE_1M = {
    "rope_local_base_freq": 1e6,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}}
GEMMA3_GLOBAL_UNSCALED = {
    "rope_scaling": None,
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
VARIANTS = {
    "gemma2-as-written": ("gemma2", {}),
    "gemma2-no-attention-softcap": ("gemma2", {"attn_logit_softcapping": None}),
    "gemma2-no-final-softcap": ("gemma2", {"final_logit_softcapping": None}),
    "gemma2-window-wider-than-prompt": ("gemma2", {"sliding_window": 4096}),
    "gemma2-layer-1-slides": ("gemma2", {"layer_types": ["full_attention", "sliding_attention"]}),
    "gemma2-scale-by-head-dim": ("gemma2", {"query_pre_attn_scalar": 16}),
    "gemma3-as-written": ("gemma3", {}),
    "gemma3-local-layers-with-global-base": ("gemma3", GEMMA3_LOCAL_ROPE_1M),
    "gemma3-global-layers-unscaled": ("gemma3", GEMMA3_GLOBAL_UNSCALED),
    "gemma3-all-layers-local": ("gemma3", {"layer_types": ["sliding_attention"] * 6}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf_and_each_feature_changes_them(checkpoint_dir, tmp_path, name):
    family, changes = VARIANTS[name]
    base = checkpoint_dir(family)
    if changes:
        assert_matches_hf(with_config(tmp_path, base, changes), base)
    else:
        assert_matches_hf(base)


@pytest.mark.parametrize("style", ["legacy", "v5"])
def test_gemma3_reads_its_layer_pattern_and_rope_bases_from_either_config_style(checkpoint_dir, tmp_path, style):
    """transformers 4.x configs give ``sliding_window_pattern`` / ``rope_local_base_freq`` / ``rope_scaling``,
    transformers 5 ``layer_types`` and ``rope_parameters`` per layer type: both load the same model."""
    path = write_checkpoint(tmp_path / style, family="gemma3", config_style=style)
    config = json.loads((path / "config.json").read_text())
    assert ("layer_types" in config) == (style == "v5") and ("sliding_window_pattern" in config) == (style == "legacy")
    attn = [layer.self_attn for layer in load_tiny(path).model.layers]
    assert [a.attn.spec.sliding_window for a in attn] == [10] * 5 + [None]
    local, global_ = attn[0].rotary_emb, attn[5].rotary_emb
    assert local.cos_cache[1, 0] == pytest.approx(torch.cos(torch.tensor(1.0)).item())
    # The slowest frequency: base 10k locally, base 1M scaled by 1/8 globally.
    assert local.sin_cache[1, -1] == pytest.approx(1e4 ** (-14 / 16), rel=1e-5)
    assert global_.sin_cache[1, -1] == pytest.approx(1e6 ** (-14 / 16) / 8, rel=1e-5)
    torch.testing.assert_close(prefill_logits(load_tiny(path), LONG_PROMPT), hf_logits(str(checkpoint_dir("gemma3"))),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("names", ["transformers4", "transformers5"])
def test_gemma3_multimodal_checkpoint_serves_its_language_model(checkpoint_dir, tmp_path, names):
    """A ``Gemma3ForConditionalGeneration`` folder: the text config is nested, the language model's tensors
    are prefixed, and the vision tower's are skipped."""
    text = checkpoint_dir("gemma3")
    path = shutil.copytree(text, tmp_path / "mm")
    text_config = json.loads((text / "config.json").read_text())
    del text_config["architectures"]
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [2, 3],
              "text_config": text_config, "vision_config": {"model_type": "siglip_vision_model"}}
    (path / "config.json").write_text(json.dumps(config))
    prefix = "language_model.model." if names == "transformers4" else "model.language_model."
    vision = "vision_tower." if names == "transformers4" else "model.vision_tower."
    tensors = {prefix + name.removeprefix("model."): t for name, t in load_file(str(text / "model.safetensors")).items()}
    tensors[vision + "vision_model.post_layernorm.weight"] = torch.ones(4)
    tensors["multi_modal_projector.mm_input_projection_weight"] = torch.ones(4, 48)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    loaded_config = load_config(path)
    assert loaded_config.architectures == ["Gemma3ForConditionalGeneration"] and loaded_config.vocab_size == 2000
    assert loaded_config.eos_token_id == [2, 3]   # the outer config's special ids win
    torch.testing.assert_close(prefill_logits(load_tiny(path), LONG_PROMPT), hf_logits(str(text)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, family):
    """6 query heads and 2 KV heads of 16 over 2 ranks: 3 query heads reading 1 KV head each."""
    path = checkpoint_dir(family)
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_heads_that_do_not_split_over_the_ranks_are_refused(checkpoint_dir):
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\) is not divisible by the tensor-parallel size \(4\)"):
        tensor_parallel_logits(checkpoint_dir("gemma2"), 4, LONG_PROMPT)


def test_bidirectional_gemma_is_refused(checkpoint_dir, tmp_path):
    path = with_config(tmp_path, checkpoint_dir("gemma3"), {"use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelConfigError, match="use_bidirectional_attention"):
        load_tiny(path)


@pytest.mark.parametrize("arch,what", [("Gemma3nForCausalLM", "AltUp"), ("GemmaForCausalLM", "not implemented")])
def test_families_not_implemented_yet_are_refused_with_the_reason(arch, what):
    class Config:
        architectures = [arch]

    with pytest.raises(UnsupportedArchitectureError, match=f"{arch} .*{what}.* not supported yet"):
        resolve_model_class(Config())
