"""KV-cache sizing from a profiled step: the budget arithmetic, the worst-case batch, and the step itself
(run here on the CPU; on a GPU ModelRunner.profile_kv_cache_budget wraps it in memory measurements)."""

from __future__ import annotations

import pytest
import torch

from llmserve.config import EngineConfig
from llmserve.worker.kv_cache_budget import kv_cache_budget, profile_batch

GiB = 2**30


def test_kv_cache_budget_arithmetic():
    # 80 GiB card at 0.9: 72 GiB, less 16 GiB weights + 2 GiB activations peak, less 1 GiB outside PyTorch.
    assert kv_cache_budget(80 * GiB, 0.9, 18 * GiB, 1 * GiB) == 53 * GiB
    assert kv_cache_budget(80 * GiB, 1.0, 0, 0) == 80 * GiB
    assert kv_cache_budget(10 * GiB, 0.5, 6 * GiB, 0) < 0   # the caller reports "no room for one block"
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            kv_cache_budget(GiB, bad, 0, 0)


def test_profile_batch_fills_the_token_budget():
    assert profile_batch(2048, 256, 4096) == [2048]
    assert profile_batch(2048, 256, 1000) == [1000, 1000, 48]
    assert profile_batch(8192, 3, 2048) == [2048, 2048, 2048]   # capped by max_num_seqs
    assert profile_batch(5, 8, 1) == [1, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        profile_batch(0, 1, 1)


def test_worst_case_step_runs_on_cpu(llama_dir):
    from llmserve import LLM

    llm = LLM(str(llama_dir), kv_cache_memory_bytes="4MiB", max_model_len=64, device="cpu")
    runner = llm.engine.runner
    lengths = profile_batch(100, 8, 64)   # [64, 36]
    sampled = runner.run_worst_case_step(lengths, max_num_seqs=8)
    assert sampled.shape == (8,) and sampled.dtype == torch.long
    assert ((sampled >= 0) & (sampled < runner.vocab_size)).all()
    with pytest.raises(ValueError, match="KV blocks"):
        runner.run_worst_case_step([runner.num_blocks * runner.block_size + 1], max_num_seqs=1)
    with pytest.raises(RuntimeError, match="GPU memory"):
        runner.profile_kv_cache_budget(100, 8, 64, 0.9)
    # Profiling-free on CPU: the engine is still usable afterwards.
    assert llm.generate(["Hello"])[0].outputs[0].token_ids


def test_gpu_flags_are_inert_on_cpu(llama_dir):
    from llmserve import LLM

    llm = LLM(str(llama_dir), kv_cache_memory_bytes="4MiB", max_model_len=64, device="cpu",
              enforce_eager=False, max_seq_len_to_capture=32)
    assert llm.engine.runner.graphs is None and not llm.engine.runner.use_cuda_graphs
    with pytest.raises(ValueError, match="max-seq-len-to-capture"):
        EngineConfig(max_seq_len_to_capture=0)
