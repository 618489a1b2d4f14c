"""Adaptive speculation's start-up timing runs decode steps the way real ones run: through the fused CPU decode
step where the model has one (as plain decodes and draft-verifying steps do), otherwise through the modules,
with the same greedy tokens either way; one least time per token count, the draft model's when there is one, and
what a token adds per token of context (rows verifying several tokens over a cached context)."""

from __future__ import annotations

import pytest
import torch

from llmserve import LLM
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.worker.step_timing import CONTEXT_QUERY, CONTEXTS, decode_step, measure_step_times


@pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels are not available")
def test_decode_steps_are_timed_on_the_path_real_decodes_take(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="8MiB", block_size=4)
    runner = llm.engine.runner
    fused = runner.fused_decode
    assert fused is not None
    calls = fused.calls
    times = measure_step_times(runner, [1, 4], CONTEXTS[1] + CONTEXT_QUERY - 1, repeats=2)   # no room for context
    assert times["draft"] is None and len(times["target"]) == 2 and all(t > 0 for t in times["target"])
    assert times["context"] == [0.0]
    assert fused.calls - calls == 2 * (1 + 2)   # per count: a warm-up and the repeats
    sampled, verifying = decode_step(runner, 3), decode_step(runner, 2, 3, 8)
    runner.fused_decode = None
    assert torch.equal(decode_step(runner, 3), sampled) and torch.equal(decode_step(runner, 2, 3, 8), verifying)
    assert fused.calls - calls == 2 * (1 + 2) + 2


@pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels are not available")
def test_the_context_cost_is_timed_on_verifying_rows_over_two_contexts(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="64MiB", block_size=16)
    runner = llm.engine.runner
    calls = runner.fused_decode.calls
    times = measure_step_times(runner, [1], CONTEXTS[1] + CONTEXT_QUERY, repeats=2)
    assert len(times["context"]) == 1 and times["context"][0] >= 0.0
    assert runner.fused_decode.calls - calls == (1 + 2) * (1 + len(CONTEXTS))


def test_a_step_needs_a_block_per_row(llama_dir):
    runner = LLM(str(llama_dir), kv_cache_memory_bytes="8MiB", block_size=4).engine.runner
    with pytest.raises(ValueError, match="blocks"):
        measure_step_times(runner, [runner.num_blocks + 1], 128)
