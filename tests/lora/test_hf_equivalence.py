"""Each adapter's greedy output equals Hugging Face transformers + PEFT on the same base and adapter (tokens
equal, logprobs within 1e-3, float32), with three adapters and the base model mixed in one batch, under
chunked prefill, preemption, fewer resident slots than adapters, and on the other families built from the same
blocks (Qwen2: biased q/k/v; Qwen3, Gemma 2/3, Cohere, Mistral, Llama 3)."""

from __future__ import annotations

import pytest

from llmserve import LLM, SamplingParams
from llmserve.lora.request import LoRARequest
from llmserve.testing.lora_adapters import FUSED_MODULES
from tests.engine.test_hf_equivalence import PROMPTS, llm_block_bytes
from tests.hf_reference import hf_greedy
from tests.lora.conftest import ADAPTERS

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)


def lora_requests(lora_adapter, family: str = "llama") -> list[LoRARequest]:
    return [LoRARequest(name, i + 1, str(lora_adapter(name, family))) for i, name in enumerate(ADAPTERS)]


def assert_matches_peft(path, outputs, loras: list[LoRARequest | None], max_tokens: int = MAX_TOKENS) -> None:
    for out, lora in zip(outputs, loras):
        ref_tokens, ref_logprobs = hf_greedy(path, out.prompt_token_ids, max_tokens,
                                             None if lora is None else lora.lora_path)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens, f"prompt {out.prompt!r}, adapter {lora and lora.lora_name}"
        got = [pos[t].logprob for pos, t in zip(completion.logprobs, completion.token_ids)]
        assert got == pytest.approx(ref_logprobs, abs=1e-3)


def mixed_batch(lora_adapter, family: str = "llama") -> tuple[list[str], list[LoRARequest | None]]:
    """Every prompt with each of the three adapters and with none: 20 requests in one batch."""
    options: list[LoRARequest | None] = [*lora_requests(lora_adapter, family), None]
    prompts = [p for p in PROMPTS for _ in options]
    return prompts, options * len(PROMPTS)


def record_step_adapters(llm: LLM) -> list[set[int]]:
    """The distinct adapter ids of every step the workers run, from the step messages themselves."""
    steps: list[set[int]] = []
    executor = llm.engine.core.executor
    execute = executor.execute_model
    ids: dict[int, int | None] = {}

    def spy(sched):
        for new in sched.new_seqs:
            ids[new.seq_id] = new.lora_request.lora_int_id if new.lora_request else None
        steps.append({ids[s] for s in sched.num_scheduled_tokens if ids.get(s) is not None})
        return execute(sched)

    executor.execute_model = spy
    return steps


def test_mixed_batch_with_chunked_prefill_and_preemption(llama_dir, lora_adapter):
    """7-token steps split the prompts; 24 blocks of 4 tokens cannot hold all 20 sequences, so some are
    preempted and recomputed; two slots for three adapters, so the scheduler keeps the third waiting."""
    llm = LLM(str(llama_dir), enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=8, block_size=4,
              max_num_batched_tokens=7, kv_cache_memory_bytes=24 * llm_block_bytes(llama_dir, 4))
    steps = record_step_adapters(llm)
    prompts, loras = mixed_batch(lora_adapter)
    outputs = llm.generate(prompts, GREEDY, lora_request=loras)
    assert llm.engine.scheduler.num_preemptions > 0
    assert max(len(s) for s in steps) == 2
    assert_matches_peft(llama_dir, outputs, loras)
    base = [o.outputs[0].token_ids for o, lora in zip(outputs, loras) if lora is None]
    for name in ADAPTERS:   # each adapter changes what the base model says
        adapted = [o.outputs[0].token_ids for o, lora in zip(outputs, loras) if lora and lora.lora_name == name]
        assert adapted != base


def test_second_family(checkpoint_dir, lora_adapter):
    """Qwen2: q/k/v carry biases; the adapters add to the biased fused projection."""
    path = checkpoint_dir("qwen2")
    llm = LLM(str(path), enable_lora=True, max_loras=3, max_lora_rank=8, kv_cache_memory_bytes="32MiB")
    prompts, loras = mixed_batch(lora_adapter, "qwen2")
    assert_matches_peft(path, llm.generate(prompts[:8], GREEDY, lora_request=loras[:8]), loras[:8])


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen3", "gemma2", "gemma3", "cohere"])
def test_other_families(checkpoint_dir, lora_adapter, family):
    """Families built from the same blocks: q/k/v-norms (Qwen3), sliding windows and soft-caps (Gemma),
    parallel blocks (Cohere) do not change where the adapters apply."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="16MiB")
    loras = lora_requests(lora_adapter, family)[:2] + [None]
    assert_matches_peft(path, llm.generate(PROMPTS[:3], GREEDY, lora_request=loras), loras)


def test_fused_checkpoint_modules(checkpoint_dir, lora_adapter):
    """Phi-3 ships qkv_proj and gate_up_proj fused, and so do its adapters: one A, B split by projection."""
    path = checkpoint_dir("phi3")
    llm = LLM(str(path), enable_lora=True, kv_cache_memory_bytes="16MiB")
    lora = LoRARequest("fused", 1, str(lora_adapter("fused", "phi3", seed=4, target_modules=FUSED_MODULES)))
    assert_matches_peft(path, llm.generate(PROMPTS[:2], GREEDY, lora_request=lora), [lora, lora])


def test_lora_enabled_leaves_base_requests_alone(llama_dir, lora_adapter):
    """With LoRA on but no adapter in the batch, output is the base model's, exactly as with LoRA off."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    on = LLM(str(llama_dir), enable_lora=True, kv_cache_memory_bytes="32MiB").generate(PROMPTS, params)
    off = LLM(str(llama_dir), kv_cache_memory_bytes="32MiB").generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert [[p[t].logprob for p, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in on] == \
        [[p[t].logprob for p, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in off]


@pytest.mark.parametrize("family,subset", [
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "rank_pattern": {"c_fc": 4}}),   # Conv1D: fan_in_fan_out
    ("bloom", {"target_modules": ["query_key_value", "dense_4h_to_h"], "rank_pattern": {"dense_4h_to_h": 4}}),
    ("falcon", {"target_modules": ["query_key_value", "dense"], "use_rslora": True}),
])
def test_gpt_era_families(checkpoint_dir, lora_adapter, family, subset):
    """GPT-2, BLOOM and Falcon name their projections their own way (c_attn, query_key_value, dense...); BLOOM's
    and Falcon's fused query_key_value interleaves heads, and an adapter's B rows follow it."""
    path = checkpoint_dir(family)
    llm = LLM(str(path), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="16MiB")
    loras = [LoRARequest("all", 1, str(lora_adapter("all", family, seed=5))),
             LoRARequest("subset", 2, str(lora_adapter("subset", family, seed=6, **subset))), None]
    assert_matches_peft(path, llm.generate(PROMPTS[:3], GREEDY, lora_request=loras), loras)
