"""An adapter is checked against the base checkpoint's modules and weight shapes before it is accepted: every
family's own adapters fit (GPT-2's Conv1D weights are stored [in, out]); another model's do not, and the
error names the module."""

from __future__ import annotations

import pytest

from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.serving_models import OpenAIServingModels
from llmserve.lora.fit import base_module_shapes, check_adapter_fits
from llmserve.lora.peft import LoRAAdapterError, load_peft_adapter
from llmserve.testing.lora_adapters import FUSED_MODULES


@pytest.mark.parametrize("family,targets", [("llama", None), ("gpt2", None), ("bloom", None), ("falcon", None),
                                            ("phi3", FUSED_MODULES)])
def test_a_familys_own_adapters_fit(checkpoint_dir, lora_adapter, family, targets):
    adapter = load_peft_adapter(lora_adapter("all", family, target_modules=targets), 8)
    check_adapter_fits(adapter, base_module_shapes(checkpoint_dir(family)), "all")


@pytest.mark.parametrize("adapter_family,base_family,message", [
    ("gemma2", "llama", r"does not fit the base model: model\.layers\.0\.self_attn\.q_proj has lora_A \[8, 48\] and "
                        r"lora_B \[96, 8\], but the base weight is \[64, 64\]"),
    ("gpt2", "bloom", r"targets transformer\.h\.0\.attn\.c_attn, which is not a module of the base model \(nor are "),
])
def test_another_models_adapter_is_refused(checkpoint_dir, lora_adapter, adapter_family, base_family, message):
    adapter = load_peft_adapter(lora_adapter("one", adapter_family, target_modules=None if adapter_family == "gpt2"
                                             else ["q_proj"]), 8)
    with pytest.raises(LoRAAdapterError, match=message):
        check_adapter_fits(adapter, base_module_shapes(checkpoint_dir(base_family)), "one")


def test_checkpoints_without_safetensors_are_not_checked_here(tmp_path):
    assert base_module_shapes(tmp_path) is None


def test_the_server_refuses_an_adapter_that_does_not_fit(checkpoint_dir, lora_adapter, llama_dir):
    """Where the server registers adapters (--lora-modules, POST /v1/load_lora_adapter): a 400 naming the module,
    and the adapter is not registered."""
    models = OpenAIServingModels(["base"], str(llama_dir), 128, enable_lora=True, max_lora_rank=8)
    with pytest.raises(APIError) as refused:
        models.load_adapter("other", str(lora_adapter("one", "gemma2", target_modules=["q_proj"])))
    assert refused.value.status == 400 and "model.layers.0.self_attn.q_proj has lora_A" in refused.value.message
    assert "other" not in models.lora_requests
    models.load_adapter("own", str(lora_adapter("all-r8")))
    assert "own" in models.lora_requests
