"""What the engine does with a request's adapter: its prefix-cache blocks are its own, and a request for an
adapter is refused before anything runs when LoRA is off or the adapter cannot be read."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams
from llmserve.errors import InvalidRequestError
from llmserve.lora.request import LoRARequest
from tests.engine.test_hf_equivalence import PROMPTS
from tests.lora.test_hf_equivalence import assert_matches_peft

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)


def test_prefix_cache_never_serves_one_adapters_kv_to_another(llama_dir, lora_adapter):
    llm = LLM(str(llama_dir), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="32MiB")
    a = LoRARequest("a", 1, str(lora_adapter("all-r8")))
    b = LoRARequest("b", 2, str(lora_adapter("patterns")))
    prompt = PROMPTS[1]   # several full blocks
    blocks = llm.engine.block_manager

    def run(lora):
        hits = blocks.prefix_hit_tokens
        out = llm.generate(prompt, PARAMS, lora_request=lora)
        return out, blocks.prefix_hit_tokens - hits

    runs = [run(lora) for lora in (a, b, None)]
    assert [hits for _, hits in runs] == [0, 0, 0]    # same tokens, three different K/V
    for lora, (out, _) in zip((a, b, None), runs):
        again, hits = run(lora)
        assert hits > 0                                # each is served its own
        assert again[0].outputs[0].token_ids == out[0].outputs[0].token_ids
        assert_matches_peft(llama_dir, again, [lora], max_tokens=6)


def test_adapter_requests_are_refused_up_front(llama_dir, lora_adapter, tmp_path):
    lora = LoRARequest("a", 1, str(lora_adapter("all-r8")))
    off = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB")
    with pytest.raises(InvalidRequestError, match="LoRA is not enabled"):
        off.generate(["Hi", "there"], PARAMS, lora_request=lora)
    on = LLM(str(llama_dir), enable_lora=True, max_lora_rank=4, kv_cache_memory_bytes="32MiB")
    with pytest.raises(InvalidRequestError, match="No adapter found"):
        on.generate("Hi", PARAMS, lora_request=LoRARequest("gone", 2, str(tmp_path / "gone")))
    with pytest.raises(InvalidRequestError, match="rank 8 is greater than --max-lora-rank 4"):
        on.generate("Hi", PARAMS, lora_request=lora)
    with pytest.raises(ValueError, match="got 2 prompts but 3 LoRARequest objects"):
        on.generate(["Hi", "there"], PARAMS, lora_request=[None, None, None])
    assert not on.engine.has_unfinished_requests()


def test_lora_request_fields():
    lora = LoRARequest("name", 3, "/adapters/name")
    assert (lora.name, lora.adapter_id, lora.path) == ("name", 3, "/adapters/name")
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("name", 0, "/adapters/name")
    with pytest.raises(ValueError, match="has no lora_path"):
        LoRARequest("name", 1, "")


def test_decode_graphs_are_offered_only_steps_without_adapter_rows(llama_dir, lora_adapter):
    """With LoRA on, the CUDA graphs (captured with no adapter active) may replay a decode step that has no adapter
    rows, never one that has. A stand-in for the graphs records which steps it was asked to run (and declines)."""
    llm = LLM(str(llama_dir), enable_lora=True, kv_cache_memory_bytes="16MiB")
    runner = llm.engine.runner
    asked: list[bool] = []

    class Graphs:
        def can_run(self, layout):
            asked.append(runner.lora_manager.active)
            return False

    runner.graphs = Graphs()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(["Hello world"], params)
    assert asked and not any(asked)   # the decode steps of a base request
    asked.clear()
    llm.generate(["Hello world"], params, lora_request=LoRARequest("a", 1, str(lora_adapter("all-r8"))))
    assert asked == []
