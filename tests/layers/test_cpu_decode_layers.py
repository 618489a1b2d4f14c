"""The one-call decode step gives exactly the module path's hidden states and KV-cache writes.

Each case prefills a few sequences through the module path (contexts spanning several KV blocks), snapshots the
caches, runs one all-decode step through the modules, restores the caches and runs the same step through the C
step. Every operation runs the same kernel on the same operands in the same order, so the comparison is exact
(``torch.equal``), for float32, bfloat16 and GGUF group-int8 weights (under float32 or bfloat16 activations),
Llama, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k norms), one row and several rows of different lengths, and
with LoRA adapters on some rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from llmserve.layers.attention.backend import BatchLayout
from llmserve.layers.attention.cpu_backend import CPUAttentionBackend
from llmserve.layers.cpu_decode_layers import FusedDecodeUnsupported
from llmserve.layers.cpu_kernels import cpu_kernels
from llmserve.lora.model_manager import LoRAModelManager
from llmserve.lora.request import LoRARequest
from llmserve.model_loader.loader import load_config, load_model
from llmserve.models.llama_fused_decode import FusedDecode
from llmserve.testing.lora_adapters import write_lora_adapter
from tests.model_helpers import new_kv_cache

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels are not available")

CPU = torch.device("cpu")
BLOCK_SIZE = 4
NUM_BLOCKS = 64


def _load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return load_model(load_config(path), path, dtype, CPU)


def _bind(model: torch.nn.Module, dtype: torch.dtype) -> CPUAttentionBackend:
    backend = CPUAttentionBackend(cpu_kernels(), dtype)
    for attn in model.attention_layers():
        attn.bind_cache(backend, *new_kv_cache(attn, NUM_BLOCKS, BLOCK_SIZE, dtype))
    return backend


def _tables(contexts: list[int]) -> list[list[int]]:
    """Each sequence's blocks for its context and one more token, interleaved across sequences (not in order)."""
    tables, next_block = [], NUM_BLOCKS - 1
    for ctx in contexts:
        count = ctx // BLOCK_SIZE + 1
        tables.append(list(range(next_block, next_block - count, -1)))
        next_block -= count
    return tables


def _slots(table: list[int], positions: range) -> list[int]:
    return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]


def _step(backend: CPUAttentionBackend, contexts: list[int], queries: list[int], tables: list[list[int]]) -> object:
    slots = [s for ctx, q, t in zip(contexts, queries, tables) for s in _slots(t, range(ctx, ctx + q))]
    layout = BatchLayout(query_lens=queries, context_lens=contexts, block_tables=tables,
                         slot_mapping=torch.tensor(slots), num_decodes=sum(q == 1 for q in queries),
                         block_size=BLOCK_SIZE)
    return backend.build_metadata(layout, CPU)


@torch.inference_mode()
def _compare(model: torch.nn.Module, dtype: torch.dtype, contexts: list[int],
             before_decode: Callable[[], None] | None = None) -> None:
    backend = _bind(model, dtype)
    tables = _tables(contexts)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (sum(contexts),), generator=generator)
    positions = torch.cat([torch.arange(c) for c in contexts])
    model(prompts, positions, _step(backend, [0] * len(contexts), contexts, tables))
    caches = [(a.key_cache, a.value_cache) for a in model.attention_layers()]
    saved = [(k.clone(), v.clone()) for k, v in caches]
    ids = torch.randint(0, vocab, (len(contexts),), generator=generator)
    decode_positions = torch.tensor(contexts)
    if before_decode is not None:
        before_decode()
    expected = model(ids, decode_positions, _step(backend, contexts, [1] * len(contexts), tables))
    expected_caches = [(k.clone(), v.clone()) for k, v in caches]
    for (k, v), (k0, v0) in zip(caches, saved):
        k.copy_(k0)
        v.copy_(v0)
    fused = FusedDecode(model.model, dtype)
    hidden = fused.forward(ids, decode_positions, _step(backend, contexts, [1] * len(contexts), tables))
    assert hidden.dtype == expected.dtype == dtype
    assert torch.equal(hidden, expected)
    for (k, v), (k1, v1) in zip(caches, expected_caches):
        assert torch.equal(k, k1) and torch.equal(v, v1)
    assert fused.calls == 1


CONTEXTS = [[9], [13, 2, 7, 21]]   # one row; rows of different lengths over 1 to 6 blocks


@pytest.mark.parametrize("contexts", CONTEXTS, ids=["one-row", "four-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_step_equals_module_path(checkpoint_dir, family, dtype, contexts):
    _compare(_load(checkpoint_dir(family), dtype), dtype, contexts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_step_equals_module_path_with_lora_adapters(checkpoint_dir, tmp_path, dtype):
    """Two adapters of different ranks (the second on q, v and down only) and base rows mixed in one step."""
    path = checkpoint_dir("llama")
    model = _load(path, dtype)
    manager = LoRAModelManager(model, 2, 8, 2, dtype, CPU)
    full = write_lora_adapter(tmp_path / "full", path, r=8, lora_alpha=16, seed=1)
    partial = write_lora_adapter(tmp_path / "partial", path, r=4, lora_alpha=8, seed=2,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    requests = {1: LoRARequest("full", 1, str(full)), 2: LoRARequest("partial", 2, str(partial))}
    lora_ids = np.array([1, 0, 2, 1, 2])

    def activate() -> None:
        manager.set_active(lora_ids, [1] * len(lora_ids), requests)
        assert len(manager.state.mapping.segments) == 2

    _compare(model, dtype, [13, 2, 7, 21, 5], activate)


@pytest.fixture(scope="module")
def gguf_path(checkpoint_dir, tmp_path_factory) -> callable:
    pytest.importorskip("gguf")
    from llmserve.testing.gguf_files import write_gguf

    root = tmp_path_factory.mktemp("fused-gguf")

    def get(family: str, file_type: str) -> Path:
        return write_gguf(checkpoint_dir(family), root / f"{family}-{file_type}.gguf", family, file_type)

    return get


@pytest.mark.parametrize("contexts", CONTEXTS, ids=["one-row", "four-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family,file_type", [("llama", "Q8_0"), ("qwen2", "Q4_K_M"), ("qwen3", "Q4_0")])
def test_fused_step_equals_module_path_on_packed_gguf_weights(gguf_path, family, file_type, dtype, contexts):
    """In bfloat16 (what ``--dtype auto`` picks for a GGUF file on a CPU with AVX512-BF16) the packed projections
    take float32 activations, widened from bfloat16, and round their outputs back, as the module path does."""
    model = _load(gguf_path(family, file_type), dtype)
    assert hasattr(model.model.layers[0].self_attn.qkv_proj, "group_int8_plan"), "the file did not load packed"
    _compare(model, dtype, contexts)


def test_a_sliding_window_layer_is_refused(checkpoint_dir):
    model = _load(checkpoint_dir("llama"), torch.float32)
    attn = model.model.layers[1].self_attn.attn
    attn.spec = dataclasses.replace(attn.spec, sliding_window=8)
    with pytest.raises(FusedDecodeUnsupported, match="sliding window"):
        FusedDecode(model.model, torch.float32)


def test_a_row_major_weight_is_refused(checkpoint_dir):
    model = _load(checkpoint_dir("llama"), torch.float32)
    proj = model.model.layers[1].mlp.down_proj
    proj.weight.data = torch.zeros(proj.output_size, proj.input_size)
    with pytest.raises(FusedDecodeUnsupported, match="weight"):
        FusedDecode(model.model, torch.float32)
