"""Reading PEFT adapters: what runs is read with PEFT's scales, everything else is refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmserve.lora.peft import LoRAAdapterError, LoRAAdapterNotFoundError, load_peft_adapter, read_adapter_config
from llmserve.testing.lora_adapters import write_lora_adapter


def test_scales_are_folded_into_b(llama_dir, tmp_path):
    """s = alpha / r, alpha / sqrt(r) with rsLoRA, and alpha_pattern's alpha for the modules it matches."""
    path = write_lora_adapter(tmp_path / "a", llama_dir, r=4, lora_alpha=8, alpha_pattern={"v_proj": 2},
                              target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2})
    raw = load_file(str(path / "adapter_model.safetensors"))
    adapter = load_peft_adapter(path, max_rank=4)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert adapter.modules[q].rank == 2 and adapter.modules[v].rank == 4 and adapter.rank == 4
    torch.testing.assert_close(adapter.modules[q].lora_b, raw[f"base_model.model.{q}.lora_B.weight"] * (8 / 2))
    torch.testing.assert_close(adapter.modules[v].lora_b, raw[f"base_model.model.{v}.lora_B.weight"] * (2 / 4))
    rs = write_lora_adapter(tmp_path / "rs", llama_dir, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    raw = load_file(str(rs / "adapter_model.safetensors"))
    torch.testing.assert_close(load_peft_adapter(rs, 4).modules[q].lora_b,
                               raw[f"base_model.model.{q}.lora_B.weight"] * (8 / math.sqrt(4)))


@pytest.mark.parametrize("extra,message", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head", "embed_tokens"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"r": 32}, "rank 32 is greater than --max-lora-rank 16"),
    ({"rank_pattern": {"q_proj": 64}}, "rank 64 is greater than --max-lora-rank 16"),
])
def test_unsupported_options_are_refused(llama_dir, tmp_path, extra, message):
    path = write_lora_adapter(tmp_path / "a", llama_dir, target_modules=["q_proj"], extra_config=extra)
    with pytest.raises(LoRAAdapterError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_peft_adapter(path, max_rank=16)


def test_tensors_rank_above_the_limit_are_refused(llama_dir, tmp_path):
    """A config that understates the rank does not get a larger one past --max-lora-rank."""
    path = write_lora_adapter(tmp_path / "a", llama_dir, r=32, target_modules=["q_proj"], extra_config={"r": 8})
    with pytest.raises(LoRAAdapterError, match="has rank 32, greater than --max-lora-rank 16"):
        load_peft_adapter(path, max_rank=16)


def test_missing_and_malformed_adapters(llama_dir, tmp_path):
    with pytest.raises(LoRAAdapterNotFoundError, match="No adapter found"):
        read_adapter_config(tmp_path / "nowhere", 16)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAAdapterError, match="not valid JSON"):
        read_adapter_config(bad, 16)
    pickled = write_lora_adapter(tmp_path / "bin", llama_dir, target_modules=["q_proj"])
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(LoRAAdapterError, match=r"adapter_model.bin \(pickle\) is not loaded"):
        load_peft_adapter(pickled, 16)
    truncated = write_lora_adapter(tmp_path / "trunc", llama_dir, target_modules=["q_proj"])
    (truncated / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(LoRAAdapterError, match="cannot be read"):
        load_peft_adapter(truncated, 16)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(next(k for k in t if k.endswith("lora_B.weight"))), "has lora_A but not its other half"),
    (lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 4)}),
     "is not a LoRA A/B weight"),
    (lambda t: t.update({k: v[:, :3].contiguous() for k, v in list(t.items()) if k.endswith("lora_B.weight")}),
     "are not \\[r, in\\] and \\[out, r\\]"),
])
def test_malformed_tensors_are_refused(llama_dir, tmp_path, edit, message):
    path = write_lora_adapter(tmp_path / "a", llama_dir, target_modules=["q_proj"])
    tensors = load_file(str(path / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match=message):
        load_peft_adapter(path, 16)


def test_config_must_be_an_object(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(LoRAAdapterError, match="must hold a JSON object"):
        read_adapter_config(tmp_path, 16)
