"""The Triton segmented shrink/expand (under the interpreter without a GPU) equals the grouped PyTorch ops
and a float64 per-row reference, base rows untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from llmserve.lora.punica import LoRABatchMapping, LoRAStack, add_lora
from tests.lora.conftest import per_row_reference, random_stack

triton_ops = pytest.importorskip("llmserve.lora.triton_ops")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("slot_per_seq,query_lens,bounds", [
    ([2, -1, 0, 2, 1, -1], [3, 1, 1, 20, 2, 5], [0, 40, 56, 72]),   # mixed, one segment longer than a row tile;
                                                                   # projections straddle column tiles
    ([1, 1], [17, 2], [0, 72]),                                     # one adapter for every row (no gather)
])
def test_segments_match_grouped_ops(slot_per_seq, query_lens, bounds):
    gen = torch.Generator().manual_seed(0)
    stack = random_stack([13, 0, 4], bounds, d_in=48, max_rank=13)   # sizes not multiples of the tiles
    lens = np.array(query_lens)
    x = torch.randn(int(lens.sum()), 48, generator=gen)
    base = torch.randn(x.shape[0], bounds[-1], generator=gen)
    mapping = LoRABatchMapping.build(np.array(slot_per_seq), lens, torch.device("cpu"))
    expected = base.clone()
    add_lora(expected, x, stack, mapping)
    out = base.clone().to(DEVICE)
    device_stack = LoRAStack(stack.a.to(DEVICE), stack.b.to(DEVICE), stack.bounds, stack.ranks)
    triton_ops.add_lora_segments(out, x.to(DEVICE), device_stack, torch.tensor(stack.ranks, device=DEVICE),
                                 torch.tensor(bounds, device=DEVICE), triton_ops.Segments.from_mapping(mapping, DEVICE))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-4)
    reference = per_row_reference(base, x, stack, np.repeat(slot_per_seq, lens))
    torch.testing.assert_close(out.cpu().double(), reference, rtol=1e-5, atol=1e-4)


def test_layers_run_the_kernels_in_the_engine(llama_dir, lora_adapter):
    """Every LoRA layer switched to the kernels: the same greedy tokens and logprobs (within 1e-4) as the
    PyTorch grouped ops, for a batch of two adapters and the base model."""
    from llmserve import LLM, SamplingParams
    from llmserve.lora.request import LoRARequest

    llm = LLM(str(llama_dir), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="16MiB",
              enable_prefix_caching=False)
    loras = [LoRARequest("a", 1, str(lora_adapter("all-r8"))), LoRARequest("b", 2, str(lora_adapter("patterns"))),
             None]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)
    prompts = ["Hello world, this is", "The quick brown fox", "A"]
    expected = llm.generate(prompts, params, lora_request=loras)
    for method in llm.engine.runner.lora_manager.layers.values():
        method.use_triton = True   # with B contiguous, as a GPU layer stores it (a CPU one stores it rank-major)
        method.stack = dataclasses.replace(method.stack, b=method.stack.b.contiguous())
    got = llm.generate(prompts, params, lora_request=loras)
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert [p[t].logprob for p, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)] == pytest.approx(
            [p[t].logprob for p, t in zip(e.outputs[0].logprobs, e.outputs[0].token_ids)], abs=1e-4)
