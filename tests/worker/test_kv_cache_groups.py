"""KV-cache groups as vLLM forms them: one group when every layer sees alike; else each kind of layer cut
into groups as large as the rarest kind, so that the i-th layer of every group can share one cache tensor. Each
layer reads its group's block tables and slots in every attention backend (the Triton kernels under the
interpreter without a GPU, on it with one). A step's metadata is built once: the other groups share everything
the rows' lengths decide and hold only their own block tables and slots."""

import dataclasses

import numpy as np
import pytest
import torch

from llmserve.layers.attention.backend import BatchLayout, KVCacheGroupMetadata, get_attention_backend
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.worker.kv_cache_groups import form_kv_cache_groups, group_metadata, one_group
from tests.engine.test_hf_equivalence import assert_matches_hf, llm_block_bytes
from tests.models.hf_logits import LONG_PROMPT

CPU = torch.device("cpu")


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


def test_a_pipeline_stage_binds_its_layers_of_the_whole_models_groups():
    """Gemma 3's 12 layers over two stages of 6: the groups are the whole model's; each stage's layers of a group
    share its tensors from 0 on, and a group may have no layer on a stage."""
    groups = form_kv_cache_groups(([16] * 5 + [None]) * 2)
    first, second = (dataclasses.replace(groups, stage=range(start, start + 6)) for start in (0, 6))
    assert first.stage_groups() == [[0, 1], [2, 3], [4], [], [], [5]]
    assert first.group_size == 2
    assert second.stage_groups() == [[], [], [0], [1, 2], [3, 4], [5]]
    assert second.group_size == 2
    assert groups.stage_groups() == groups.layers


def test_one_group_slides_only_if_every_layer_does():
    assert one_group(3, [4, 8, 8]).windows == [8]
    assert one_group(3, [4, None, 8]).windows == [None]


def use_backend(monkeypatch, backend: str) -> torch.device:
    """Select ``backend`` for engines built in the test; returns the device it runs on (Triton: the GPU where there
    is one, else the CPU under the interpreter)."""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backend == "cpu" and cpu_kernels() is None:
        pytest.skip("the CPU kernels could not be built here")
    monkeypatch.setenv("LLMSERVE_ATTENTION_BACKEND", backend)
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else CPU


# Decodes over short and long contexts (one past the window's blocks), then prefill chunks: a fresh prompt, one
# over a cached context and one past the window.
CONTEXTS, QUERIES, NUM_DECODES, WINDOW, BS = [3, 17, 40, 9, 0, 6, 30], [1, 1, 1, 1, 7, 3, 5], 4, 10, 4


def three_groups_step(device: torch.device = CPU) -> tuple[BatchLayout, np.ndarray, np.ndarray]:
    """A step's layout (its slots on ``device``) and its ``[3, ...]`` block tables and slots: each group's blocks
    are distinct ids."""
    width = max(-(-(c + q) // BS) for c, q in zip(CONTEXTS, QUERIES))
    tables = np.arange(3 * len(CONTEXTS) * width, dtype=np.int32).reshape(3, len(CONTEXTS), width)
    slots = np.array([[tables[g, i, p // BS] * BS + p % BS for i, (c, q) in enumerate(zip(CONTEXTS, QUERIES))
                       for p in range(c, c + q)] for g in range(3)], dtype=np.int64)
    layout = BatchLayout(query_lens=QUERIES, context_lens=CONTEXTS, block_tables=tables[0],
                         slot_mapping=torch.from_numpy(slots[0]).to(device), num_decodes=NUM_DECODES, block_size=BS)
    return layout, tables, slots


UNCOMPARED = ("backend", "layout", "shapes", "_decodes", "_prefills", "choose_splits", "_window_splits")


def assert_same_values(actual, expected, path="metadata"):
    """Every field of two metadata (dataclasses, lists, tensors, arrays) equal, skipping the caches and the backend."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), path
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(actual, expected), path
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            if f.name not in UNCOMPARED:
                assert_same_values(getattr(actual, f.name), getattr(expected, f.name), f"{path}.{f.name}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_values(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


def step_pieces(metadata) -> list:
    """What the step's layers read: the PyTorch and CPU backends' decode and prefill pieces of each window
    (built on first use), or Triton's metadata itself."""
    if not hasattr(metadata, "decodes_for"):
        return [metadata]
    return [piece for w in (WINDOW, None) for piece in (metadata.decodes_for(w), metadata.prefills_for(w))]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_group_metadata_is_built_once_and_each_group_reads_its_own_blocks(monkeypatch, backend):
    """Each group's metadata equals one built from scratch for its block tables and slots, and holds the first
    group's tensors for everything the lengths decide (lengths, offsets, masks, padding)."""
    device = use_backend(monkeypatch, backend)
    attention = get_attention_backend(device, torch.float32)
    layout, tables, slots = three_groups_step(device)
    metadata = group_metadata(attention, layout, tables, slots, device)
    assert isinstance(metadata, KVCacheGroupMetadata) and len(metadata) == 3
    first = step_pieces(metadata[0])
    for g in range(3):
        own = dataclasses.replace(layout, block_tables=tables[g], slot_mapping=torch.from_numpy(slots[g]).to(device))
        fresh = attention.build_metadata(own, device)
        assert torch.equal(metadata[g].slot_mapping.cpu(), torch.from_numpy(slots[g]))
        pieces = step_pieces(metadata[g])
        assert_same_values(pieces, step_pieces(fresh))
        if backend == "triton":
            shared = ("decode_seq_lens", "prefill_query_start", "prefill_query_lens", "prefill_context_lens")
            assert all(getattr(metadata[g], name) is getattr(first[0], name) for name in shared)
            assert g == 0 or not torch.equal(metadata[g].decode_block_tables, first[0].decode_block_tables)
            continue
        decodes = [groups if isinstance(groups, list) else [groups] for groups in pieces[0::2]]
        first_decodes = [groups if isinstance(groups, list) else [groups] for groups in first[0::2]]
        for mine, theirs in zip(decodes, first_decodes):
            for a, b in zip(mine, theirs):
                assert (a.bias is b.bias) if backend == "torch" else (a.seq_lens is b.seq_lens)
                assert g == 0 or not torch.equal(a.block_tables, b.block_tables)
        for mine, theirs in zip(pieces[1::2], first[1::2]):
            assert all(a.mask is b.mask for a, b in zip(mine, theirs))
            assert g == 0 or not any(torch.equal(a.block_table, b.block_table) for a, b in zip(mine, theirs))


def test_one_group_keeps_the_plain_metadata(monkeypatch):
    use_backend(monkeypatch, "torch")
    layout, tables, slots = three_groups_step()
    metadata = group_metadata(get_attention_backend(CPU, torch.float32), layout, tables[:1], slots[:1], CPU)
    assert not isinstance(metadata, KVCacheGroupMetadata) and metadata.layout is layout


@pytest.mark.parametrize("backend,family,layer_groups,pool", [
    ("torch", "gemma3", [0, 1, 2, 3, 4, 5], 7), ("cpu", "gemma3", [0, 1, 2, 3, 4, 5], 7),
    ("triton", "gemma2", [0, 1], 12), ("torch", "gemma4", [0, 1, 3, 2], 12)])
def test_each_layer_reads_its_groups_blocks_in_every_backend(checkpoint_dir, monkeypatch, backend, family,
                                                             layer_groups, pool):
    """Gemma 3's six layers form six groups of one layer (five sliding, one full) and Gemma 2's two, sharing one
    cache tensor, each writing and reading its own group's blocks; so do Gemma 4's three sliding layers (2 KV heads
    of 16) and its full one (1 of 24, a padded view), whose two KV-sharing layers read their sources' groups:
    greedy output equals transformers' over prefill chunks, decodes and a preemption. (Gemma 4 through the Triton
    kernels: tests/models/test_gemma4.py.)"""
    device = use_backend(monkeypatch, backend)
    from llmserve import LLM, SamplingParams

    path = checkpoint_dir(family)
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=8, kv_cache_memory_bytes=pool * llm_block_bytes(path, 4),
              device=str(device), dtype="float32")
    runner = llm.engine.core.executor.worker.runner
    assert runner.backend.name == backend and runner.kv_cache_groups.num_groups == len(layer_groups)
    layers = runner.model.attention_layers()
    assert len({a.key_cache.data_ptr() for a in layers}) == 1   # one tensor, viewed by every group's layer
    assert [a.kv_cache_group for a in layers] == layer_groups
    prompts = [LONG_PROMPT[:20], LONG_PROMPT[:13], LONG_PROMPT[:20]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, outputs, max_tokens=10)
