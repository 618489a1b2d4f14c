"""Checkpoint loading: local folders, sharded safetensors, dtypes, and a precise error for every way a
checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve import LLM, SamplingParams
from llmserve.model_loader.loader import ModelNotFoundError, resolve_model_path
from llmserve.models.llama import CheckpointMismatchError
from llmserve.models.registry import UnsupportedArchitectureError
from llmserve.testing.checkpoints import write_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_gives_same_output_as_single_file(tmp_path, llama_dir):
    sharded = write_checkpoint(tmp_path / "sharded", family="llama", size="tiny", seed=0, max_shard_bytes=100_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    single = LLM(str(llama_dir), kv_cache_memory_bytes="8MiB").generate("Hello there", GREEDY)
    shard = LLM(str(sharded), kv_cache_memory_bytes="8MiB").generate("Hello there", GREEDY)
    assert single[0].outputs[0].token_ids == shard[0].outputs[0].token_ids


@pytest.mark.parametrize("dtype,expected", [("auto", torch.float32), ("float32", torch.float32),
                                            ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype(llama_dir, dtype, expected):
    llm = LLM(str(llama_dir), dtype=dtype, kv_cache_memory_bytes="8MiB")
    assert llm.engine.dtype == expected
    assert all(p.dtype == expected for p in llm.engine.runner.model.parameters())
    out = llm.generate("Hello", GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 8


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        LLM(str(tmp_path / "empty"))


def test_hub_id_offline_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        resolve_model_path("some-org/some-model-that-is-not-cached", download_dir=str(tmp_path / "cache"))


def test_unsupported_architecture_names_the_supported_ones(tmp_path, llama_dir):
    path = copy_checkpoint(llama_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as info:
        LLM(str(path))
    message = str(info.value)
    assert "GPTNeoXForCausalLM" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


def _rewrite_weights(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path, llama_dir):
    path = copy_checkpoint(llama_dir, tmp_path / "m")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors: model\.layers\.1\.mlp\.gate_up_proj"):
        LLM(str(path))


def test_misshaped_tensor_is_named(tmp_path, llama_dir):
    path = copy_checkpoint(llama_dir, tmp_path / "m")

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].clone()

    _rewrite_weights(path, edit)
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        LLM(str(path))


def test_unexpected_tensor_is_named(tmp_path, llama_dir):
    path = copy_checkpoint(llama_dir, tmp_path / "m")
    _rewrite_weights(path, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(3)))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors: model\.layers\.0\.mystery\.weight"):
        LLM(str(path))


def test_missing_shard_is_named(tmp_path):
    path = write_checkpoint(tmp_path / "sharded", family="llama", size="tiny", max_shard_bytes=100_000)
    victim = sorted(path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelNotFoundError, match=victim.name):
        LLM(str(path))


def test_max_model_len_larger_than_the_model_is_refused(llama_dir):
    with pytest.raises(ValueError, match="larger than the model's maximum context length"):
        LLM(str(llama_dir), max_model_len=10**6)


def test_separate_tokenizer_folder(tmp_path, llama_dir):
    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama_dir / name, tokenizer_only / name)
    llm = LLM(str(llama_dir), tokenizer=str(tokenizer_only), kv_cache_memory_bytes="8MiB")
    assert llm.generate("Hello", GREEDY)[0].outputs[0].text
