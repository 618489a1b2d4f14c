"""Adapter steps in CUDA graphs: the Triton kernels over the static segment buffers (a grid fixed by the captured
size and ``--max-loras``) equal the per-step segments, and decode graphs captured with LoRA replay mixed adapter
batches as the eager path computes them (on the CPU through the stand-in replay of tests/worker/test_cuda_graphs.py,
on a GPU through real graphs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llmserve.lora.layers import LoRABatchState
from llmserve.lora.punica import LoRABatchMapping, LoRAStack, add_lora
from tests.lora.conftest import random_stack

triton_ops = pytest.importorskip("llmserve.lora.triton_ops")
from llmserve.lora.graph_inputs import LoRAGraphInputs  # noqa: E402  (needs triton)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to capture graphs")
stand_in = pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in replays run on a machine without a GPU")


def _run_static(inputs: LoRAGraphInputs, size: int, base: torch.Tensor, x: torch.Tensor, stack: LoRAStack,
                bounds: list[int]) -> torch.Tensor:
    """The kernels as a graph of ``size`` rows launches them: over the static buffers, after a refill."""
    inputs.fill()
    out = base.clone().to(DEVICE)
    device_stack = LoRAStack(stack.a.to(DEVICE), stack.b.to(DEVICE), stack.bounds, stack.ranks)
    triton_ops.add_lora_segments(out, x.to(DEVICE), device_stack, torch.tensor(stack.ranks, device=DEVICE),
                                 torch.tensor(bounds, device=DEVICE), inputs.segments(size))
    return out.cpu()


def test_static_segments_give_the_steps_deltas_and_leave_padding_rows_alone():
    """One buffer set for a 24-row graph and 4 slots: a mixed step, then one adapter for all rows, then a step with
    fewer segments than the one before (its stale segments must not run again), then no adapter rows."""
    gen = torch.Generator().manual_seed(0)
    bounds = [0, 40, 56, 72]
    stack = random_stack([13, 0, 4, 7], bounds, d_in=48, max_rank=13)
    size = 24
    state = LoRABatchState()
    inputs = LoRAGraphInputs(state, max_loras=4, max_rows=size, device=DEVICE)
    x = torch.randn(size, 48, generator=gen)
    base = torch.randn(size, bounds[-1], generator=gen)
    steps = [[2, -1, 0, 2, 3, -1, 1, 0], [3] * 5, [-1, 0, -1], [-1, -1, -1, -1]]
    for slot_per_seq in steps:
        n = len(slot_per_seq)
        state.mapping = LoRABatchMapping.build(np.array(slot_per_seq), np.ones(n, dtype=np.int64), torch.device("cpu"))
        expected = base.clone()
        if state.mapping.segments:   # (the layers call nothing without adapter rows)
            add_lora(expected[:n], x[:n], stack, state.mapping)
        got = _run_static(inputs, size, base, x, stack, bounds)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        assert torch.equal(got[n:], base[n:])   # the padding rows of the graph


def test_a_step_larger_than_the_buffers_is_refused():
    state = LoRABatchState()
    inputs = LoRAGraphInputs(state, max_loras=2, max_rows=4, device=DEVICE)
    state.mapping = LoRABatchMapping.build(np.array([0, 1, 0, 1, 0]), np.ones(5, dtype=np.int64), torch.device("cpu"))
    with pytest.raises(ValueError, match="5 tokens in 2 adapter segments does not fit graphs captured for 4 rows"):
        inputs.fill()


def test_capturing_swaps_in_the_static_mapping_and_restores_the_steps():
    state = LoRABatchState()
    inputs = LoRAGraphInputs(state, max_loras=3, max_rows=8, device=DEVICE)
    before = state.mapping
    with inputs.capturing(4):
        mapping = state.mapping
        assert [slot for slot, _, _ in mapping.segments] == [0, 1, 2] and mapping.num_tokens == 4
        segments = mapping.device_segments(DEVICE)
        assert segments.max_length == 4 and len(segments.lengths) == 3
    assert state.mapping is before


def _switch_to_kernels(llm) -> None:
    """Every LoRA layer on the Triton kernels, B contiguous as a GPU layer stores it (a CPU one stores it
    rank-major)."""
    for method in llm.engine.runner.lora_manager.layers.values():
        method.use_triton = True
        method.stack = dataclasses.replace(method.stack, b=method.stack.b.contiguous())


def _generate(llm, prompts, loras, max_tokens=8):
    from llmserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outputs = llm.generate(prompts, params, lora_request=loras)
    return ([o.outputs[0].token_ids for o in outputs],
            [[p[t].logprob for p, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs])


def _assert_same(got, expected):
    assert got[0] == expected[0]
    for g, e in zip(got[1], expected[1]):
        assert g == pytest.approx(e, abs=1e-4)


@stand_in
def test_decode_graphs_with_lora_replay_mixed_adapter_steps(llama_dir, lora_adapter, monkeypatch):
    """Two adapters and the base model in one batch: every decode step replays a LoRA graph (the kernels reading the
    static segments) and gives the eager tokens and logprobs; base-only steps replay the graphs without adapters."""
    from llmserve import LLM
    from llmserve.lora.request import LoRARequest
    from tests.worker.test_cuda_graphs import EagerReplayGraphs

    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "triton")
    llm = LLM(str(llama_dir), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="4MiB",
              max_model_len=64, device="cpu", block_size=4, enable_prefix_caching=False)
    a, b = LoRARequest("a", 1, str(lora_adapter("all-r8"))), LoRARequest("b", 2, str(lora_adapter("patterns")))
    prompts, loras = ["Hello world, this is", "The quick brown fox", "A", "import os"], [a, b, None, a]
    expected = _generate(llm, prompts, loras)
    expected_base = _generate(llm, prompts[2:], None)
    _switch_to_kernels(llm)
    runner = llm.engine.runner
    assert runner.lora_manager.supports_cuda_graphs
    graphs = EagerReplayGraphs(runner.model, runner.backend, runner.block_size, max_num_seqs=4,
                               max_seq_len_to_capture=64, device=runner.device,
                               lora_graph_inputs=runner.lora_manager.graph_inputs)
    graphs.capture_without_cuda(llm.engine.hf_config.hidden_size)
    assert sorted(graphs.lora_graphs) == sorted(graphs.graphs) == [1, 2, 4]
    runner.graphs = graphs
    _assert_same(_generate(llm, prompts, loras), expected)
    assert graphs.lora_graphs[4].graph.replays == 7 and graphs.replays == 0   # every decode step of the four
    _assert_same(_generate(llm, prompts[2:], None), expected_base)
    assert graphs.graphs[2].graph.replays == 7 and graphs.lora_replays == 7


@needs_cuda
def test_cuda_graphs_with_lora_match_eager(llama_dir, lora_adapter):
    from llmserve import LLM
    from llmserve.lora.request import LoRARequest

    llm = LLM(str(llama_dir), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="64MiB",
              max_model_len=64, device="cuda", dtype="float32", enable_prefix_caching=False)
    runner = llm.engine.runner
    graphs = runner.graphs
    assert graphs is not None and graphs.lora_graphs
    replays = []
    run = graphs.run
    graphs.run = lambda *args: replays.append(args[-1]) or run(*args)
    a, b = LoRARequest("a", 1, str(lora_adapter("all-r8"))), LoRARequest("b", 2, str(lora_adapter("patterns")))
    prompts, loras = ["Hello world, this is", "The quick brown fox", "A", "import os"], [a, b, None, a]
    with_graphs = _generate(llm, prompts, loras)
    assert replays.count(True) == 7   # every decode step of the four, through the graphs captured with LoRA
    runner.graphs = None
    _assert_same(_generate(llm, prompts, loras), with_graphs)
