"""An adapter is checked against the base checkpoint's modules and weight shapes before it is accepted: every
family's own adapters fit (GPT-2's Conv1D weights are stored [in, out]); another model's do not, and the
error names the module."""

from __future__ import annotations

import pytest

from llmserve.entrypoints.openai.errors import APIError
from llmserve.entrypoints.openai.serving_models import OpenAIServingModels
from llmserve.lora.fit import AdapterChecker, base_module_shapes, check_adapter_fits
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
    models = OpenAIServingModels(["base"], str(llama_dir), 128, enable_lora=True,
                                 adapters=AdapterChecker(llama_dir, 8))
    with pytest.raises(APIError) as refused:
        models.load_adapter("other", str(lora_adapter("one", "gemma2", target_modules=["q_proj"])))
    assert refused.value.status == 400 and "model.layers.0.self_attn.q_proj has lora_A" in refused.value.message
    assert "other" not in models.lora_requests
    models.load_adapter("own", str(lora_adapter("all-r8")))
    assert "own" in models.lora_requests


def _adapter_for(path, base, module: str, a_shape: tuple[int, int], b_shape: tuple[int, int]):
    """A PEFT adapter (as PEFT writes one) on a single base module."""
    import json

    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    prefix = f"base_model.model.{module}"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(a_shape), f"{prefix}.lora_B.weight": torch.zeros(b_shape)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": a_shape[0], "lora_alpha": 16, "target_modules": [module.rpartition(".")[2]],
        "bias": "none", "base_model_name_or_path": str(base)}))
    return path


@pytest.mark.parametrize("module,a_shape,b_shape", [
    ("lm_head", (8, 64), (2000, 8)),                             # fits the head's weight, but the head is not adapted
    ("model.embed_tokens", (8, 2000), (64, 8)),
    ("model.layers.0.input_layernorm", (8, 64), (64, 8)),        # a norm's weight is a vector
])
def test_an_adapter_on_a_module_lora_does_not_adapt_is_refused_where_it_is_registered(llama_dir, tmp_path, module,
                                                                                      a_shape, b_shape):
    """Refused at registration (the server's 400, offline's InvalidRequestError), not in every request's step."""
    from llmserve import LLM, SamplingParams
    from llmserve.errors import InvalidRequestError
    from llmserve.lora.request import LoRARequest

    path = _adapter_for(tmp_path / "adapter", llama_dir, module, a_shape, b_shape)
    with pytest.raises(LoRAAdapterError, match=f"targets {module}, which is not a linear layer LoRA can adapt"):
        check_adapter_fits(load_peft_adapter(path, 8), base_module_shapes(llama_dir), "odd")
    models = OpenAIServingModels(["base"], str(llama_dir), 128, enable_lora=True,
                                 adapters=AdapterChecker(llama_dir, 8))
    with pytest.raises(APIError) as refused:
        models.load_adapter("odd", str(path))
    assert refused.value.status == 400 and "not a linear layer LoRA can adapt" in refused.value.message
    llm = LLM(str(llama_dir), enable_lora=True, max_lora_rank=8, kv_cache_memory_bytes="8MiB", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="not a linear layer LoRA can adapt") as offline:
        llm.generate(["a", "b"], SamplingParams(max_tokens=1), lora_request=[None, LoRARequest("odd", 1, str(path))])
    assert offline.value.param == "lora_request" and str(offline.value).startswith("prompt 1: ")


def test_offline_a_pickled_adapter_is_refused_before_anything_runs(llama_dir, lora_adapter, tmp_path):
    import shutil

    from llmserve import LLM, SamplingParams
    from llmserve.errors import InvalidRequestError
    from llmserve.lora.request import LoRARequest

    pickled = tmp_path / "pickled"
    shutil.copytree(lora_adapter("all-r8"), pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    llm = LLM(str(llama_dir), enable_lora=True, max_lora_rank=8, kv_cache_memory_bytes="8MiB", max_model_len=64)
    with pytest.raises(InvalidRequestError, match=r"adapter_model\.bin \(pickle\) is not loaded"):
        llm.generate(["a"], SamplingParams(max_tokens=1), lora_request=LoRARequest("p", 1, str(pickled)))


def test_an_adapter_is_read_once_per_path(lora_adapter, llama_dir, monkeypatch):
    """The server's registration and the engine front end share one checker: the adapter a client registered
    is not read again for its first request; a path that failed is read again (it may have been fixed)."""
    import llmserve.lora.fit as fit

    reads = []
    real = fit.load_peft_adapter
    monkeypatch.setattr(fit, "load_peft_adapter", lambda path, rank: reads.append(path) or real(path, rank))
    checker = AdapterChecker(llama_dir, 8)
    path = str(lora_adapter("all-r8"))
    for _ in range(3):
        checker.check(path, "own")
    assert reads == [path]
    bad = str(lora_adapter("one", "gemma2", target_modules=["q_proj"]))
    for _ in range(2):
        with pytest.raises(LoRAAdapterError):
            checker.check(bad, "other")
    assert reads == [path, bad, bad]
    checker.forget(path)   # unloaded: a new registration of the path reads it again (it may have changed)
    checker.check(path, "own")
    assert reads == [path, bad, bad, path]


def test_unloading_an_adapter_lets_its_path_be_read_again(lora_adapter, llama_dir, tmp_path):
    """A path unloaded and then registered again is read again: an adapter since removed from disk is a 404,
    not let through by what was read the first time."""
    import shutil

    checker = AdapterChecker(llama_dir, 8)
    models = OpenAIServingModels(["base"], str(llama_dir), 128, enable_lora=True, adapters=checker)
    path = tmp_path / "adapter"
    shutil.copytree(lora_adapter("all-r8"), path)
    models.load_adapter("a", str(path))
    models.unload_adapter("a")
    shutil.rmtree(path)
    with pytest.raises(APIError) as gone:
        models.load_adapter("a", str(path))
    assert gone.value.status == 404
