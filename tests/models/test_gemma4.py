"""Gemma 4 (text): every feature is computed as transformers computes it, and each one changes the output (so the
engine-level HF-equivalence tests would catch an engine that got it wrong or ignored it); layers that share K/V
hold no cache; the multimodal checkpoint serves its language model; what llmserve cannot run is refused with a
message that says what.

KV sharing, ``attention_k_eq_v`` and the double-wide MLPs are in the tensors themselves (shared layers have no
K/V weights, full layers no ``v_proj``, shared layers' MLPs twice as wide): a model without them cannot load the
checkpoint, and one that took the wrong layer's K/V or values would not match transformers.

The MoE block (``gemma4_moe``: 5 experts of 32 beside every dense MLP, top-2) matches transformers as written, with
its per-expert and router scales at one and with top-1 (each changes the output), and over 2 tensor-parallel ranks
with each expert split or whole experts distributed."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():   # the Triton kernels under the interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import load_file, save_file

from llmserve.layers.attention.shared_kv import SharedKVAttention
from llmserve.layers.fused_moe import FusedMoE
from llmserve.model_loader.loader import load_config
from llmserve.models.llama import UnsupportedModelConfigError
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, hf_logits, with_config

ROPE_10K = {"rope_type": "default", "rope_theta": 10000.0}
VARIANTS = {
    "as-written": ({}, None),
    "no-final-softcap": ({"final_logit_softcapping": None}, None),
    "window-wider-than-prompt": ({"sliding_window": 4096}, None),
    "global-layers-rotate-every-dim": ({"rope_parameters": {
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 1.0, "rope_theta": 1e6},
        "sliding_attention": ROPE_10K}}, None),
    "global-layers-with-the-local-rope": ({"rope_parameters": {
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e4},
        "sliding_attention": ROPE_10K}}, None),
    "no-per-layer-inputs": ({}, {"per_layer_input_gate.weight": 0.0}),       # the gated input adds nothing
    "per-layer-inputs-by-token-only": ({}, {"per_layer_model_projection.weight": 0.0}),
    "unit-layer-scalars": ({}, {"layer_scalar": None}),                       # None: set to ones
    "unit-query-norms": ({}, {"q_norm.weight": None}),
    "values-at-another-scale": ({}, {"v_proj.weight": 5.0}),   # same output: the value norm takes the scale out
}
SAME_OUTPUT = {"values-at-another-scale"}
MOE_VARIANTS = {
    "unit-per-expert-scales": ({}, {"router.per_expert_scale": None}),
    "unit-router-scale": ({}, {"router.scale": None}),
    "top-1": ({"top_k_experts": 1}, None),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_hf_and_each_feature_changes_them(checkpoint_dir, tmp_path, name):
    config, tensors = VARIANTS[name]
    base = checkpoint_dir("gemma4")
    if config or tensors:
        assert_matches_hf(with_config(tmp_path, base, config, tensors), base, changes_output=name not in SAME_OUTPUT)
    else:
        assert_matches_hf(base)


def test_layers_sharing_kv_hold_no_cache_and_read_the_last_layer_of_their_type(checkpoint_dir):
    """6 layers, sliding sliding full sliding | sliding full; the last two share: layer 4 reads layer 3's K/V
    (not layer 0's or 1's), layer 5 layer 2's. Full layers have head_dim 24 and one KV head, local ones 16 and 2;
    layers of a type share their rotary table."""
    model = load_tiny(checkpoint_dir("gemma4"))
    attn = [layer.self_attn.attn for layer in model.model.layers]
    assert model.attention_layers() == attn[:4]
    assert [type(a) for a in attn[4:]] == [SharedKVAttention] * 2
    assert attn[4].source is attn[3] and attn[5].source is attn[2]
    assert [(a.num_heads, a.num_kv_heads, a.head_dim, a.spec.sliding_window) for a in attn] == [
        (6, 2, 16, 10), (6, 2, 16, 10), (6, 1, 24, None), (6, 2, 16, 10), (6, 2, 16, 10), (6, 1, 24, None)]
    shared = dict(model.model.layers[4].named_parameters())
    assert "self_attn.q_proj.weight" in shared and not any("qkv" in n or "k_norm" in n for n in shared)
    assert model.model.layers[4].mlp.down_proj.input_size == 256   # double-wide
    rotary = [layer.self_attn.rotary_emb for layer in model.model.layers]   # one table per layer type
    assert all(r is rotary[0] for r in rotary[:2] + rotary[3:5]) and rotary[5] is rotary[2] is not rotary[0]


def test_multimodal_checkpoint_serves_its_language_model(checkpoint_dir, tmp_path):
    """A ``Gemma4ForConditionalGeneration`` folder: the text config is nested, the language model's tensors are
    under ``model.language_model.``, the vision and audio towers' are skipped, and K/V weights of layers that
    share K/V (which transformers ignores too) are dropped."""
    text = checkpoint_dir("gemma4")
    path = shutil.copytree(text, tmp_path / "mm")
    text_config = json.loads((text / "config.json").read_text())
    del text_config["architectures"]
    config = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "eos_token_id": [2, 3],
              "text_config": text_config, "vision_config": None, "audio_config": None}
    (path / "config.json").write_text(json.dumps(config))
    tensors = {"model.language_model." + name.removeprefix("model."): t
               for name, t in load_file(str(text / "model.safetensors")).items()}
    tensors["model.language_model.layers.4.self_attn.k_proj.weight"] = torch.ones(32, 48)
    for tower in ("model.vision_tower.encoder.weight", "model.embed_vision.embedding_projection.weight",
                  "model.audio_tower.output_proj.weight", "model.embed_audio.embedding_projection.weight"):
        tensors[tower] = torch.ones(4, 4)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    loaded_config = load_config(path)
    assert loaded_config.architectures == ["Gemma4ForConditionalGeneration"] and loaded_config.eos_token_id == [2, 3]
    torch.testing.assert_close(prefill_logits(load_tiny(path), LONG_PROMPT), hf_logits(str(text)), atol=1e-4, rtol=1e-4)


def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir):
    """Over 2 ranks: 3 query heads per rank reading 1 of the 2 local KV heads, or the one global KV head (on both
    ranks); the per-layer-input weights are on every rank."""
    path = checkpoint_dir("gemma4")
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_triton_backend_matches_hf(checkpoint_dir, monkeypatch):
    """Shared K/V, head sizes 16 and 24 and the window through the Triton kernels (the interpreter without a GPU):
    chunked prefill over cached context and decodes, against transformers."""
    pytest.importorskip("triton", reason="triton is not installed")
    from llmserve import LLM, SamplingParams
    from llmserve.layers.attention.triton_backend import TritonAttentionBackend
    from tests.engine.test_hf_equivalence import PROMPTS, assert_matches_hf

    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "triton")
    path = checkpoint_dir("gemma4")
    llm = LLM(str(path), device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32", block_size=4,
              max_num_batched_tokens=7, kv_cache_memory_bytes="4MiB")
    assert isinstance(llm.engine.runner.backend, TritonAttentionBackend)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    assert_matches_hf(path, llm.generate(PROMPTS[:3], params), max_tokens=8)


def test_moe_block_matches_hf_beside_every_dense_mlp(checkpoint_dir):
    path = checkpoint_dir("gemma4_moe")
    assert_matches_hf(path, checkpoint_dir("gemma4"))   # the experts' branch changes the output
    layers = load_tiny(path).model.layers
    assert all(isinstance(layer.experts, FusedMoE) and layer.experts.num_experts == 5 for layer in layers)
    assert layers[0].mlp.down_proj.input_size == 128 and layers[4].mlp.down_proj.input_size == 256


@pytest.mark.parametrize("name", list(MOE_VARIANTS))
def test_moe_block_variants_match_hf_and_change_the_output(checkpoint_dir, tmp_path, name):
    config, tensors = MOE_VARIANTS[name]
    base = checkpoint_dir("gemma4_moe")
    assert_matches_hf(with_config(tmp_path, base, config, tensors), base)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "experts-distributed"])
def test_moe_block_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, expert_parallel):
    """Each rank its half of every expert's 32 intermediate rows, or experts 0-2 and 3-4 whole; the router and
    the block's norms on every rank."""
    path = checkpoint_dir("gemma4_moe")
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT, expert_parallel):
        torch.testing.assert_close(logits, hf_logits(str(path)), atol=1e-4, rtol=1e-4)


MOE = {"enable_moe_block": True, "num_experts": 5, "top_k_experts": 2, "moe_intermediate_size": 32}


@pytest.mark.parametrize("changes,match", [
    ({**MOE, "moe_intermediate_size": None}, "enable_moe_block=true needs moe_intermediate_size"),
    ({**MOE, "top_k_experts": 6}, r"top_k_experts \(6\) must be between 1 and num_experts \(5\)"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention='all'"),
])
def test_what_llmserve_cannot_run_is_refused(checkpoint_dir, tmp_path, changes, match):
    with pytest.raises(UnsupportedModelConfigError, match=match):
        load_tiny(with_config(tmp_path, checkpoint_dir("gemma4"), changes))


def test_pipeline_parallelism_is_refused(checkpoint_dir):
    from tests.parallel_sim import as_rank, simulated_groups

    with as_rank(pp=simulated_groups(2)[0]), pytest.raises(UnsupportedModelConfigError, match="pipeline"):
        load_tiny(checkpoint_dir("gemma4"))
