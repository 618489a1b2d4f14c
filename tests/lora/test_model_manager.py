"""The worker's adapter sets: least recently used adapters leave the resident slots (--max-loras) and the CPU
set (--max-cpu-loras), and reloading one gives the same output; an adapter that does not fit the model fails
only its own request."""

from __future__ import annotations

from llmserve import LLM, SamplingParams
from llmserve.lora.request import LoRARequest
from llmserve.testing.lora_adapters import write_lora_adapter
from tests.lora.conftest import ADAPTERS

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_lru_between_cpu_and_slots(llama_dir, lora_adapter):
    llm = LLM(str(llama_dir), enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8,
              kv_cache_memory_bytes="32MiB", enable_prefix_caching=False)
    manager = llm.engine.runner.lora_manager
    loras = [LoRARequest(name, i + 1, str(lora_adapter(name))) for i, name in enumerate(ADAPTERS)]
    first = {}
    for lora, resident, on_cpu in zip(loras, ([1], [2], [3]), ([1], [1, 2], [2, 3])):
        first[lora.lora_int_id] = llm.generate("Hello world", PARAMS, lora_request=lora)[0].outputs[0].token_ids
        assert manager.resident_ids == resident and manager.cpu_ids == on_cpu
    again = llm.generate(["Hello world"] * 3, PARAMS, lora_request=loras)   # 1 is read from disk again
    assert [o.outputs[0].token_ids for o in again] == [first[1], first[2], first[3]]
    assert len(set(map(tuple, first.values()))) == 3


def test_adapter_that_does_not_fit_the_model_fails_its_request_only(llama_dir, checkpoint_dir, tmp_path,
                                                                    monkeypatch):
    """An adapter made for another model (Gemma 2's shapes), on a base whose checkpoint headers the front end
    cannot read (a GGUF file or an S3 mirror: nothing to check it against before it runs), fails where a worker
    loads it; the base request and a good adapter's request in the same batch finish normally. (With the headers
    at hand it is refused before anything runs: tests/lora/test_fit.py.)"""
    monkeypatch.setattr("llmserve.lora.fit.base_module_shapes", lambda path: None)
    wrong = write_lora_adapter(tmp_path / "wrong", checkpoint_dir("gemma2"), target_modules=["q_proj"])
    good = write_lora_adapter(tmp_path / "good", llama_dir, target_modules=["q_proj"])
    llm = LLM(str(llama_dir), enable_lora=True, max_loras=2, kv_cache_memory_bytes="32MiB")
    outputs = llm.generate(["Hello world"] * 3, PARAMS,
                           lora_request=[LoRARequest("wrong", 1, str(wrong)), None, LoRARequest("good", 2, str(good))])
    assert outputs[0].error is not None and "lora_A" in outputs[0].error
    assert outputs[1].error is None and len(outputs[1].outputs[0].token_ids) == 6
    assert outputs[2].error is None and len(outputs[2].outputs[0].token_ids) == 6
