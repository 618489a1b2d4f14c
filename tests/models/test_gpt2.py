"""GPT-2: Conv1D checkpoints (transposed, fused ``c_attn``) load into the shared linears whole or sharded, the
attention-scale options compute what transformers computes, and what llmserve cannot run is refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.model_loader.loader import iterate_weights, load_config
from llmserve.models.gpt2 import GPT2LMHeadModel
from llmserve.models.llama import UnsupportedModelConfigError
from tests.model_helpers import load_tiny, prefill_logits, tensor_parallel_logits
from tests.models.hf_logits import LONG_PROMPT, assert_matches_hf, with_config


@pytest.mark.parametrize("changes", [
    {},
    {"scale_attn_by_inverse_layer_idx": True},
    {"scale_attn_weights": False},
    {"activation_function": "gelu_pytorch_tanh"},
    {"activation_function": "relu"},
], ids=["as-written", "scale-by-inverse-layer", "unscaled", "gelu-tanh", "relu"])
def test_logits_match_hf_and_each_option_changes_them(checkpoint_dir, tmp_path, changes):
    base = checkpoint_dir("gpt2")
    path = with_config(tmp_path, base, changes) if changes else base
    # gelu_pytorch_tanh is the same curve as gelu_new to 1e-4
    assert_matches_hf(path, base if changes and changes.get("activation_function") != "gelu_pytorch_tanh" else None)


def test_layers_take_the_checkpoint_conv1d_weights_transposed(checkpoint_dir):
    path = checkpoint_dir("gpt2")
    tensors = load_file(str(path / "model.safetensors"))
    model = GPT2LMHeadModel(load_config(path))
    model.load_weights(iterate_weights(path))   # before the CPU kernels re-block the weights
    layer = model.model.layers[1]
    assert torch.equal(layer.self_attn.qkv_proj.weight, tensors["transformer.h.1.attn.c_attn.weight"].t())
    assert torch.equal(layer.mlp.up_proj.weight, tensors["transformer.h.1.mlp.c_fc.weight"].t())
    assert torch.equal(layer.mlp.down_proj.weight, tensors["transformer.h.1.mlp.c_proj.weight"].t())


def test_openai_converted_checkpoint_names_load_the_same(checkpoint_dir, tmp_path):
    """The original ``gpt2`` files: no ``transformer.`` prefix, the causal-mask buffers saved as
    ``h.N.attn.bias`` / ``masked_bias``, and the tied matrix stored again as ``lm_head.weight``."""
    base = checkpoint_dir("gpt2")
    path = shutil.copytree(base, tmp_path / "openai")
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(str(base / "model.safetensors")).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for (name, a), (_, b) in zip(load_tiny(base).named_parameters(), load_tiny(path).named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir):
    """c_attn splits into q/k/v before each rank takes its heads; c_fc/c_proj narrow like Llama's MLP."""
    path = checkpoint_dir("gpt2")
    expected = prefill_logits(load_tiny(path), LONG_PROMPT)
    for logits in tensor_parallel_logits(path, 2, LONG_PROMPT):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("changes,message", [
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"activation_function": "gelu_10"}, "unsupported activation 'gelu_10'"),
])
def test_unsupported_options_are_refused(checkpoint_dir, tmp_path, changes, message):
    with pytest.raises((UnsupportedModelConfigError, ValueError), match=message):
        load_tiny(with_config(tmp_path, checkpoint_dir("gpt2"), changes))
