"""The step profiler counts the fused CPU decode step as model forward time, not engine overhead."""

from __future__ import annotations

import time

from llmserve import LLM
from llmserve.benchmarks.profiling import decode_steps


def test_fused_decode_steps_count_as_forward_time(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="16MiB")
    fused = llm.engine.runner.fused_decode
    assert fused is not None, "the tiny Llama runs the fused decode step"
    run = fused.forward

    def slow_forward(*args):
        time.sleep(0.05)   # far above anything else a tiny model's step does
        return run(*args)

    fused.forward = slow_forward
    _, decodes = decode_steps(llm.engine, [[5, 17, 99], [300, 42]], output_len=6)
    assert decodes and all(r.forward_s >= 0.05 and r.overhead_s < 0.05 for r in decodes)
