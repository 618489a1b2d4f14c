"""The worker's KV cache: one cache per layer that holds K/V, none for layers that reuse an earlier layer's
(Gemma 4), one entry per token for latent attention (DeepSeek), and a startup log line that says how many layers
hold K/V and in what form."""

from __future__ import annotations

import logging

import pytest

from llmserve import LLM
from llmserve.layers.attention.shared_kv import SharedKVAttention
from tests.engine.test_hf_equivalence import pool_block_bytes


@pytest.mark.parametrize("family,line", [
    ("gemma4", "in each of 1 cache tensors, shared by 4 KV-cache groups of the 4 attention layers (2 more reuse an "
               "earlier layer's K/V and hold none)"),
    ("llama", "in each of 2 attention layers\n"),
    ("deepseek_v2", "in each of 3 attention layers (latent attention: one 40-value entry per token and layer, read "
                    "as key and value)"),
], ids=["gemma4", "llama", "deepseek_v2"])
def test_kv_cache_is_allocated_for_the_layers_that_hold_kv_and_logged(checkpoint_dir, caplog, family, line):
    path = checkpoint_dir(family)
    with caplog.at_level(logging.INFO, logger="llmserve.worker.worker"):
        llm = LLM(str(path), block_size=4, kv_cache_memory_bytes="1MiB")
    runner = llm.engine.runner
    assert f"KV cache: {runner.num_blocks} blocks {line}" in caplog.text
    assert runner.kv_cache_bytes_per_block() == pool_block_bytes(path, 4)
    shared = [m for m in runner.model.modules() if isinstance(m, SharedKVAttention)]
    assert len(shared) == (2 if family == "gemma4" else 0)
    assert all(m.key_cache.numel() == m.value_cache.numel() == 0 for m in shared)
