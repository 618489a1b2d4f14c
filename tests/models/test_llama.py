"""The Llama-shaped families: each family file's block choices, checkpoints that ship fused q/k/v and
gate/up tensors, the whole model sharded over simulated tensor-parallel ranks, and YaRN rope scaling."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.models.llama import CheckpointMismatchError, LlamaBlockSpec
from tests.model_helpers import PROMPT, bind_cache, load_tiny, step_metadata
from tests.models.hf_logits import assert_matches_hf, with_config
from tests.parallel_sim import as_rank, run_ranks, shape_only_group, simulated_groups


@pytest.mark.parametrize("family,spec", [
    ("llama", LlamaBlockSpec()),
    ("mistral", LlamaBlockSpec()),
    ("qwen2", LlamaBlockSpec(qkv_bias=True)),
    ("qwen3", LlamaBlockSpec(qk_norm=True)),
])
def test_each_family_states_its_blocks(checkpoint_dir, family, spec):
    model = load_tiny(checkpoint_dir(family))
    assert type(model).block_spec(model.config) == spec
    attn = model.model.layers[0].self_attn
    assert (attn.qkv_proj.bias is not None) == spec.qkv_bias and (attn.o_proj.bias is not None) == spec.o_bias
    assert (attn.q_norm is not None) == spec.qk_norm


def fuse(path, layers: int = 2) -> None:
    """Rewrite a checkpoint the way Phi-3 ships it: q/k/v as one ``qkv_proj``, gate/up as ``gate_up_proj``."""
    tensors = load_file(str(path / "model.safetensors"))
    for i in range(layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [tensors.pop(f"{p}self_attn.{x}_proj.{kind}", None) for x in "qkv"]
            if parts[0] is not None:
                tensors[f"{p}self_attn.qkv_proj.{kind}"] = torch.cat(parts)
        tensors[f"{p}mlp.gate_up_proj.weight"] = torch.cat([tensors.pop(f"{p}mlp.gate_proj.weight"),
                                                            tensors.pop(f"{p}mlp.up_proj.weight")])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("family", ["llama", "qwen2"])   # qwen2: fused q/k/v biases too
@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_fused_checkpoint_tensors_load_like_separate_ones(tmp_path, checkpoint_dir, family, tp_rank, tp_size):
    separate_path = checkpoint_dir(family)
    fused_path = shutil.copytree(separate_path, tmp_path / "fused")
    fuse(fused_path)
    with as_rank(tp=shape_only_group(tp_rank, tp_size)):
        separate, fused = load_tiny(separate_path), load_tiny(fused_path)
    pairs = list(zip(separate.named_parameters(), fused.named_parameters()))
    assert len(pairs) == len(list(separate.parameters()))
    for (name, a), (name_b, b) in pairs:
        assert name == name_b and torch.equal(a, b), name


def test_a_partial_fused_checkpoint_names_what_is_missing(tmp_path, checkpoint_dir):
    path = shutil.copytree(checkpoint_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.mlp.gate_up_proj.weight"] = torch.cat([tensors.pop("model.layers.0.mlp.gate_proj.weight"),
                                                                   tensors.pop("model.layers.0.mlp.up_proj.weight")])
    tensors["model.layers.1.self_attn.qkv_proj.weight"] = tensors.pop("model.layers.1.self_attn.q_proj.weight")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight.*shape"):
        load_tiny(path)


# qwen3 at TP=4: its 2 KV heads are replicated over the 4 ranks
@pytest.mark.parametrize("family,tp", [("llama", 2), ("qwen2", 2), ("llama3", 2), ("qwen3", 4)])
def test_tensor_parallel_ranks_compose_to_the_single_rank_model(checkpoint_dir, family, tp):
    path = checkpoint_dir(family)
    full = load_tiny(path)
    ranks = []
    for group in simulated_groups(tp):
        with as_rank(tp=group):
            ranks.append(load_tiny(path))
    attn = ranks[0].model.layers[0].self_attn
    assert attn.num_heads == 4 // tp and attn.num_kv_heads == max(1, 2 // tp)
    assert ranks[0].model.layers[0].mlp.down_proj.input_size_per_partition == 128 // tp
    ids, positions = torch.tensor(PROMPT), torch.arange(len(PROMPT))
    with torch.inference_mode():
        expected = full.compute_logits(full(ids, positions, step_metadata(bind_cache(full), 0, len(PROMPT))))

    def rank_logits(model):
        hidden = model(ids, positions, step_metadata(bind_cache(model), 0, len(PROMPT)))
        return model.compute_logits(hidden)

    for logits in run_ranks([lambda m=m: rank_logits(m) for m in ranks]):
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_yarn_rope_scaling_matches_hf(checkpoint_dir, tmp_path):
    """YaRN (Qwen2.5's long-context configs): the frequencies ramp between extrapolated and interpolated and cos/sin
    carry the attention factor, as transformers computes them; it changes the output."""
    base = checkpoint_dir("qwen2")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1000000.0}
    assert_matches_hf(with_config(tmp_path, base, {"rope_parameters": yarn, "rope_scaling": yarn}), base)
