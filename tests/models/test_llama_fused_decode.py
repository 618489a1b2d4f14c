"""Through the engine, the fused CPU decode step runs every all-decode step of a Llama-shaped model, gives
transformers' greedy output, runs steps with LoRA adapter rows exactly as the module path does, runs the steps
where a sequence verifies speculated tokens or continues a prompt by a short chunk (each token a decode row), and
leaves to the module path the steps it does not cover: a fresh prompt's prefill, adapter rows of a stack the
compiled LoRA kernel does not take, and models with a sliding window."""

from __future__ import annotations

import logging

import pytest

from llmserve import LLM, SamplingParams
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.lora.request import LoRARequest
from llmserve.testing.lora_adapters import write_lora_adapter
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels are not available")

MAX_TOKENS = 10
PROMPTS = ["Hello world, this is", "The quick brown fox jumps over the lazy dog and then keeps running far away",
           "A"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)


class StepLog:
    """Which steps took the fused path and which the modules (each step's rows: (decodes, rows))."""

    def __init__(self, llm: LLM) -> None:
        runner = llm.engine.runner
        self.fused: list[tuple[int, int]] = []
        self.modules: list[tuple[int, int]] = []
        fused_forward = runner.fused_decode.forward

        def forward(ids, positions, metadata):
            self.fused.append((metadata.layout.num_decodes, len(metadata.layout.query_lens)))
            return fused_forward(ids, positions, metadata)

        runner.fused_decode.forward = forward
        runner.model.register_forward_pre_hook(lambda module, args: self._module_step(args[2].layout))
        self.module_rows: list[tuple[int, int, bool]] = []   # and whether a row prefilled a fresh prompt

    def _module_step(self, layout) -> None:
        self.modules.append((layout.num_decodes, len(layout.query_lens)))
        fresh = any(q > 1 and c == 0 for q, c in zip(layout.query_lens, layout.context_lens))
        self.module_rows.append((*self.modules[-1], fresh))


def _greedy(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return [(o.outputs[0].token_ids, [p[t].logprob for p, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_output_matches_transformers_with_the_fused_step(checkpoint_dir, family):
    path = checkpoint_dir(family)
    llm = LLM(str(path), kv_cache_memory_bytes="32MiB", block_size=4)
    log = StepLog(llm)
    for out in llm.generate(PROMPTS, GREEDY):
        ref_tokens, ref_logprobs = hf_greedy(path, out.prompt_token_ids, MAX_TOKENS)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        got = [p[t].logprob for p, t in zip(completion.logprobs, completion.token_ids)]
        assert got == pytest.approx(ref_logprobs, abs=1e-3)
    # every step after the prompts' is all decodes, and each ran fused
    assert len(log.fused) == MAX_TOKENS - 1 and all(d == r == len(PROMPTS) for d, r in log.fused)
    assert all(d < r for d, r in log.modules)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bfloat16_output_is_the_module_paths_exactly(checkpoint_dir, family):
    """bfloat16 against transformers is compared up to ties (tests/engine/test_bfloat16.py); against the module
    path the fused step is exact: the same tokens and logprobs."""
    path = checkpoint_dir(family)
    fused = LLM(str(path), dtype="bfloat16", kv_cache_memory_bytes="32MiB", block_size=4)
    log = StepLog(fused)
    modules = LLM(str(path), dtype="bfloat16", kv_cache_memory_bytes="32MiB", block_size=4)
    modules.engine.runner.fused_decode = None
    assert _greedy(fused) == _greedy(modules)
    assert len(log.fused) == MAX_TOKENS - 1


def test_a_fresh_prompt_takes_the_module_path_and_short_continuations_run_fused(checkpoint_dir):
    """A 7-token budget prefills the long prompt in chunks beside the others' decodes: its first chunk (no cached
    context) takes the module path; its later chunks continue a cached context by at most 16 tokens, so their
    steps run fused, each token a decode row of its own over the context before it."""
    path = checkpoint_dir("llama")
    llm = LLM(str(path), max_num_batched_tokens=7, block_size=4, kv_cache_memory_bytes="32MiB")
    log = StepLog(llm)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert log.modules and all(fresh for _, _, fresh in log.module_rows), "a module step without a fresh prompt"
    assert any(0 < d < r for d, r in log.fused), "no fused step mixed decodes with a continued prefill chunk"
    for out in outputs:
        assert out.outputs[0].token_ids == hf_greedy(path, out.prompt_token_ids, MAX_TOKENS)[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_speculated_tokens_are_verified_fused_with_the_output_unchanged(checkpoint_dir, family):
    """A speculating sequence brings 1 + k tokens to a step: the step runs fused, and greedy output and logprobs
    are those without speculation (whose decodes run fused one token at a time)."""
    path = checkpoint_dir(family)
    prompts = ["one two three four one two three four one two", "a b c a b c a b c a b"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    on = LLM(str(path), kv_cache_memory_bytes="32MiB", block_size=4, speculative_config=ngram)
    log = StepLog(on)
    off = LLM(str(path), kv_cache_memory_bytes="32MiB", block_size=4)
    got, want = on.generate(prompts, params), off.generate(prompts, params)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [p[t].logprob for p, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)] == pytest.approx(
            [p[t].logprob for p, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)], abs=1e-4)
    assert any(d < r for d, r in log.fused), "no step verified drafts"
    assert on.engine.scheduler.spec_stats.num_accepted_tokens > 0
    assert all(fresh for _, _, fresh in log.module_rows)


def test_a_sliding_window_model_keeps_the_module_path(checkpoint_dir, caplog):
    with caplog.at_level(logging.INFO, logger="llmserve.models.llama_fused_decode"):
        llm = LLM(str(checkpoint_dir("phi3")), kv_cache_memory_bytes="16MiB")
    assert llm.engine.runner.fused_decode is None
    assert any("Fused CPU decode step: off" in r.getMessage() and "sliding window" in r.getMessage()
               for r in caplog.records)


def _adapters(path, tmp_path) -> list[LoRARequest | None]:
    """Two adapters of different ranks (the second on some projections only: q and v of the fused qkv, and down)
    and a base row, mixed across the prompts."""
    full = write_lora_adapter(tmp_path / "full", path, r=8, lora_alpha=16, seed=1)
    partial = write_lora_adapter(tmp_path / "partial", path, r=4, lora_alpha=8, seed=2,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    first, second = LoRARequest("full", 1, str(full)), LoRARequest("partial", 2, str(partial))
    return [first, second, None, first]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_steps_with_lora_adapter_rows_run_fused_and_equal_the_module_path(checkpoint_dir, tmp_path, caplog, dtype):
    path = checkpoint_dir("llama")
    prompts = [*PROMPTS, "Once upon a time"]
    loras = _adapters(path, tmp_path)
    kwargs = dict(dtype=dtype, enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="16MiB",
                  block_size=4)
    with caplog.at_level(logging.INFO, logger="llmserve.models.llama_fused_decode"):
        fused = LLM(str(path), **kwargs)
    assert any("Fused CPU decode step: on" in r.getMessage() for r in caplog.records)
    assert not any("module path" in r.getMessage() for r in caplog.records)
    log = StepLog(fused)
    modules = LLM(str(path), **kwargs)
    modules.engine.runner.fused_decode = None

    def run(llm: LLM, requests: list[LoRARequest | None]) -> list[tuple[list[int], list[float]]]:
        return [(o.outputs[0].token_ids, [p[t].logprob for p, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                for o in llm.generate(prompts, GREEDY, lora_request=requests)]

    got = run(fused, loras)
    assert got == run(modules, loras)   # exact: the same hidden states, so the same logits
    assert len(log.fused) == MAX_TOKENS - 1 and all(d == r == len(prompts) for d, r in log.fused)
    base = run(modules, [None] * len(prompts))
    assert got[0] != base[0] and got[1] != base[1] and got[2] == base[2]   # the adapters change their rows only


def test_a_float16_adapter_stack_keeps_lora_steps_on_the_module_path(checkpoint_dir, tmp_path, caplog):
    """The compiled LoRA kernel takes float32 and bfloat16 slots: float16 ones keep adapter steps on the module
    path, base steps stay fused."""
    path = checkpoint_dir("llama")
    adapter = write_lora_adapter(tmp_path / "adapter", path, r=8, lora_alpha=16, seed=1)
    with caplog.at_level(logging.INFO, logger="llmserve.models.llama_fused_decode"):
        llm = LLM(str(path), enable_lora=True, max_lora_rank=8, lora_dtype="float16", kv_cache_memory_bytes="16MiB")
    assert any("Fused CPU decode step: on" in r.getMessage() for r in caplog.records)
    assert any("LoRA adapter rows take the module path" in r.getMessage() and "float16" in r.getMessage()
               for r in caplog.records)
    log = StepLog(llm)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    with_adapter = llm.generate(["Hello world"], params, lora_request=LoRARequest("a", 1, str(adapter)))
    assert log.fused == [] and len(log.modules) == 4
    base = llm.generate(["Hello world"], params)
    assert len(log.fused) == 3
    assert with_adapter[0].outputs[0].token_ids != base[0].outputs[0].token_ids
    assert base[0].outputs[0].token_ids == hf_greedy(path, base[0].prompt_token_ids, 4)[0]
