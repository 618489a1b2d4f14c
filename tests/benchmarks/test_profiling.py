"""The step profiler counts what runs a step's layers in the model's place (the fused CPU decode step, the CUDA
graphs' replay) as model forward time, not engine overhead; on CUDA it waits for each timed call's kernels."""

from __future__ import annotations

import time

import torch

from llmserve import LLM
from llmserve.benchmarks.profiling import _Timer, decode_steps


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


class _SlowGraphs:
    """Stands in for captured CUDA graphs: takes every decode step and takes as long as a replay's kernels."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size

    def can_run(self, layout) -> bool:
        return layout.num_decodes == len(layout.query_lens)

    def run(self, layouts, input_ids, positions, rotary_lengths, with_lora=False) -> torch.Tensor:
        time.sleep(0.05)
        return torch.zeros(len(input_ids), self.hidden_size)


def test_graph_replays_count_as_forward_time(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="16MiB")
    llm.engine.runner.graphs = _SlowGraphs(llm.engine.hf_config.hidden_size)
    _, decodes = decode_steps(llm.engine, [[5, 17, 99], [300, 42]], output_len=6)
    assert decodes and all(r.forward_s >= 0.05 and r.overhead_s < 0.05 for r in decodes)


def test_a_timed_call_waits_for_the_work_before_it_and_for_its_own():
    """On CUDA, kernels launched earlier finish before the clock starts and the call's own before it stops."""
    events = []
    timer = _Timer(lambda: events.append("call"), "call", synchronize=lambda: events.append("synchronize"))
    timer()
    assert events == ["synchronize", "call", "synchronize"]
