"""KV-cache groups as vLLM forms them: one group when every layer sees alike; else each kind of layer cut
into groups as large as the rarest kind, so that the i-th layer of every group can share one cache tensor. Each
layer reads its group's block tables and slots in every attention backend (the Triton kernels under the
interpreter here, without a GPU)."""

import pytest
import torch

from llmserve.worker.kv_cache_groups import form_kv_cache_groups, one_group
from tests.engine.test_hf_equivalence import assert_matches_hf, llm_block_bytes
from tests.models.hf_logits import LONG_PROMPT


def test_layers_that_all_see_alike_form_one_group():
    assert form_kv_cache_groups([None] * 3) == one_group(3, [None] * 3)
    groups = form_kv_cache_groups([8] * 4)
    assert (groups.windows, groups.layers, groups.group_size) == ([8], [[0, 1, 2, 3]], 4)


def test_alternating_layers_form_two_groups_of_half_the_layers():   # Gemma 2
    groups = form_kv_cache_groups([8, None, 8, None, 8, None])
    assert groups.windows == [8, None]
    assert groups.layers == [[0, 2, 4], [1, 3, 5]] and groups.group_size == 3


def test_five_local_to_one_global_forms_groups_of_the_rarer_kind():   # Gemma 3: 5 sliding : 1 full
    windows = ([16] * 5 + [None]) * 2
    groups = form_kv_cache_groups(windows)
    assert groups.group_size == 2
    assert groups.windows == [16] * 5 + [None]
    assert groups.layers == [[0, 1], [2, 3], [4, 6], [7, 8], [9, 10], [5, 11]]


def test_a_kinds_last_group_may_be_short():
    groups = form_kv_cache_groups([4, 4, 4, None, None])
    assert groups.windows == [4, 4, None] and groups.layers == [[0, 1], [2], [3, 4]] and groups.group_size == 2


def test_one_group_slides_only_if_every_layer_does():
    assert one_group(3, [4, 8, 8]).windows == [8]
    assert one_group(3, [4, None, 8]).windows == [None]


@pytest.mark.parametrize("backend,family,layer_groups", [("torch", "gemma2", [0, 1]), ("triton", "gemma2", [0, 1]),
                                                         ("torch", "gemma4", [0, 1, 3, 2])])
def test_each_layer_reads_its_groups_blocks_in_every_backend(checkpoint_dir, monkeypatch, backend, family,
                                                             layer_groups):
    """Gemma 2's sliding and full layers share one cache tensor, each writing and reading its own group's
    blocks; so do Gemma 4's three sliding layers (2 KV heads of 16) and its full one (1 of 24, a padded view),
    whose two KV-sharing layers read their sources' groups: greedy output equals transformers' over prefill
    chunks, decodes and a preemption. (The compiled CPU backend: tests/engine/test_kv_cache_groups.py; Gemma 4
    through the Triton kernels: tests/models/test_gemma4.py.)"""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", backend)
    from llmserve import LLM, SamplingParams

    path = checkpoint_dir(family)
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=8, kv_cache_memory_bytes=12 * llm_block_bytes(path, 4))
    runner = llm.engine.core.executor.worker.runner
    assert runner.backend.name == backend and runner.kv_cache_groups.num_groups == len(layer_groups)
    layers = runner.model.attention_layers()
    assert len({a.key_cache.data_ptr() for a in layers}) == 1   # one tensor, viewed by every group's layer
    assert [a.kv_cache_group for a in layers] == layer_groups
    prompts = [LONG_PROMPT[:20], LONG_PROMPT[:13], LONG_PROMPT[:20]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, outputs, max_tokens=16)
