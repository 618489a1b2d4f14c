"""CUDA-graph bookkeeping that does not need a GPU: capture sizes, batch padding, and the replay path's
static buffers, checked end to end on the CPU with a stand-in "graph" whose replay runs the forward
eagerly on the captured static inputs (so padding, metadata refills and the eager fallbacks are the real
code; only the CUDA capture itself is not)."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmserve.worker.cuda_graphs import (
    MAX_CAPTURE_BATCH_SIZE,
    DecodeGraphs,
    _Graph,
    capture_batch_sizes,
    padded_batch_size,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to capture graphs")
# The stand-in replays run the Triton kernels on the CPU under the interpreter, which can only be switched on before
# triton is imported, so not beside a GPU; there test_cuda_graph_capture_and_replay_match_eager captures real graphs.
stand_in = pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in replays run on a machine without a GPU")


def test_capture_sizes_follow_vllm():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(4) == [1, 2, 4]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_batch_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in itertools.pairwise(sizes[3:]))
    big = capture_batch_sizes(1024)
    assert big[-1] == MAX_CAPTURE_BATCH_SIZE and big[big.index(256) + 1] == 272
    assert sorted(set(big)) == big
    with pytest.raises(ValueError):
        capture_batch_sizes(0)


def test_padded_batch_size():
    sizes = capture_batch_sizes(20)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 20)] == [1, 2, 4, 8, 8, 16, 20, 20]
    assert padded_batch_size(21, sizes) is None


# ---------------------------------------------------------------------------------------------- replay path
class _EagerReplay:
    """Stands in for a captured graph: replay recomputes the forward from the same static buffers."""

    def __init__(self, fn):
        self.fn = fn
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.fn()


class EagerReplayGraphs(DecodeGraphs):
    def capture_without_cuda(self, hidden_size: int) -> None:
        """Record every graph as a replay of the forward over the static buffers; a LoRA graph's replay reads the
        static segment buffers, as the captured kernels would, not the step's own mapping."""
        def record(size, metadata):
            ids, pos, lengths = self.input_ids[:size], self.positions[:size], self.rotary_lengths[:size]
            output = torch.empty(size, hidden_size)
            captured_mapping = None if self.lora is None else self.lora.state.mapping

            def run():
                if captured_mapping is not None:
                    step_mapping, self.lora.state.mapping = self.lora.state.mapping, captured_mapping
                try:
                    with torch.inference_mode():
                        output.copy_(self.model(ids, pos, metadata, rotary_lengths=lengths))
                finally:
                    if captured_mapping is not None:
                        self.lora.state.mapping = step_mapping

            return _Graph(_EagerReplay(run), metadata, output)

        self.record_all(record)

    @property
    def replays(self) -> int:
        return sum(g.graph.replays for g in self.graphs.values())

    @property
    def lora_replays(self) -> int:
        return sum(g.graph.replays for g in self.lora_graphs.values())


def _generate(llm, prompts, max_tokens):
    from llmserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outputs], [len(o.prompt_token_ids) for o in outputs]


def _replays_expected(prompt_lens, max_tokens, max_seq_len):
    """Decode step k (1-based) of a batch that stays together reads contexts of prompt_len + k tokens."""
    return sum(1 for k in range(1, max_tokens) if max(prompt_lens) + k <= max_seq_len)


@stand_in
def test_graph_replay_path_matches_eager_and_torch_backend(llama_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")
    from llmserve import LLM
    from llmserve.layers.attention.triton_backend import TritonAttentionBackend

    prompts = ["Hi there", "The quick fox", "A", "import os"]
    max_tokens, max_seq_len = 10, 14
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "torch")
    expected, prompt_lens = _generate(LLM(str(llama_dir), kv_cache_memory_bytes="4MiB", max_model_len=64,
                                          device="cpu"), prompts, max_tokens)
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "triton")
    llm = LLM(str(llama_dir), kv_cache_memory_bytes="4MiB", max_model_len=64, device="cpu", block_size=4)
    runner = llm.engine.runner
    assert isinstance(runner.backend, TritonAttentionBackend)
    assert runner.graphs is None   # CPU: nothing is captured
    assert _generate(llm, prompts, max_tokens)[0] == expected

    # Sizes 1, 2, 4, 5. Four decodes replay the size-4 graph until the longest context passes 14 tokens,
    # then fall back to eager steps; three decodes are padded to 4; one alone uses size 1.
    graphs = EagerReplayGraphs(runner.model, runner.backend, runner.block_size, max_num_seqs=5,
                               max_seq_len_to_capture=max_seq_len, device=runner.device)
    assert graphs.sizes == [1, 2, 4, 5]
    graphs.capture_without_cuda(llm.engine.hf_config.hidden_size)
    runner.graphs = graphs
    assert _generate(llm, prompts, max_tokens)[0] == expected
    four = graphs.graphs[4].graph
    replayed = _replays_expected(prompt_lens, max_tokens, max_seq_len)
    assert four.replays == replayed and 0 < replayed < max_tokens - 1   # some steps eager, some replayed
    assert _generate(llm, prompts[1:], max_tokens)[0] == expected[1:]
    assert four.replays == replayed + _replays_expected(prompt_lens[1:], max_tokens, max_seq_len)
    assert graphs.graphs[2].graph.replays == 0 and graphs.graphs[5].graph.replays == 0
    assert _generate(llm, prompts[2:3], max_tokens)[0] == expected[2:3]
    assert graphs.graphs[1].graph.replays == _replays_expected(prompt_lens[2:3], max_tokens, max_seq_len)


@stand_in
def test_graph_replay_writes_every_kv_cache_groups_blocks(checkpoint_dir, monkeypatch):
    """Gemma 2's sliding and full layers read their own groups' block tables and slots from the graphs' static
    buffers (the lengths shared): replayed decodes, two sequences past the 10-token window, equal the eager
    PyTorch-backend run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")
    from llmserve import LLM
    from llmserve.layers.attention.backend import KVCacheGroupMetadata

    path = str(checkpoint_dir("gemma2"))
    prompts = [{"prompt_token_ids": [(i * 37) % 200 + 5 for i in range(n)]} for n in (9, 14, 3)]
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "torch")
    expected = _generate(LLM(path, kv_cache_memory_bytes="4MiB", max_model_len=64, device="cpu"), prompts, 12)[0]
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "triton")
    llm = LLM(path, kv_cache_memory_bytes="4MiB", max_model_len=64, device="cpu", block_size=4)
    runner = llm.engine.runner
    assert runner.kv_cache_groups.num_groups == 2
    graphs = EagerReplayGraphs(runner.model, runner.backend, runner.block_size, max_num_seqs=4,
                               max_seq_len_to_capture=64, device=runner.device, num_kv_cache_groups=2)
    graphs.capture_without_cuda(llm.engine.hf_config.hidden_size)
    static = graphs.graphs[4].metadata
    assert isinstance(static, KVCacheGroupMetadata) and static[1].decode_seq_lens is static[0].decode_seq_lens
    assert static[1].decode_block_tables is not static[0].decode_block_tables
    runner.graphs = graphs
    assert _generate(llm, prompts, 12)[0] == expected
    assert graphs.graphs[4].graph.replays == 11   # every decode step of the three (padded to 4)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


@needs_cuda
# Gemma 2: a sliding and a full KV-cache group; Phi-3 LongRoPE: the 28-token prompt crosses the 32-token switch
# inside a replay while the 40-token one is long throughout.
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3_longrope"])
def test_cuda_graph_capture_and_replay_match_eager(checkpoint_dir, family):
    pytest.importorskip("triton")
    from llmserve import LLM

    prompts = [{"prompt_token_ids": [(i * 37) % 200 + 5 for i in range(n)]} for n in (28, 40, 9, 1)]
    llm = LLM(str(checkpoint_dir(family)), kv_cache_memory_bytes="64MiB", max_model_len=64, device="cuda",
              dtype="float32")
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.graphs.sizes[0] == 1
    with_graphs = _generate(llm, prompts, 12)[0]
    runner.graphs = None
    assert _generate(llm, prompts, 12)[0] == with_graphs


@stand_in
def test_graph_replay_switches_longrope_per_sequence(checkpoint_dir, monkeypatch):
    """Replayed decodes read each row's rotary length from the graphs' persistent buffer: a 28-token prompt
    crosses LongRoPE's 32-token switch at its 5th new token, inside a replay, while a 40-token prompt in the same
    graph is long throughout; both equal the eager PyTorch-backend run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")
    from llmserve import LLM

    path = str(checkpoint_dir("phi3_longrope"))
    prompts = [{"prompt_token_ids": [(i * 37) % 1990 + 5 for i in range(n)]} for n in (28, 40)]
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "torch")
    expected = _generate(LLM(path, kv_cache_memory_bytes="4MiB", max_model_len=64, device="cpu"), prompts, 10)[0]
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", "triton")
    llm = LLM(path, kv_cache_memory_bytes="4MiB", max_model_len=64, device="cpu", block_size=4)
    runner = llm.engine.runner
    graphs = EagerReplayGraphs(runner.model, runner.backend, runner.block_size, max_num_seqs=2,
                               max_seq_len_to_capture=64, device=runner.device)
    graphs.capture_without_cuda(llm.engine.hf_config.hidden_size)
    runner.graphs = graphs
    assert _generate(llm, prompts, 10)[0] == expected
    assert graphs.graphs[2].graph.replays == 9   # every decode step of the pair
