"""Run a loaded model directly (no engine): bind a small KV cache and build one step's attention metadata."""

from __future__ import annotations

from pathlib import Path

import torch

from llmserve.layers.attention.backend import BatchLayout
from llmserve.layers.attention.layer import Attention
from llmserve.layers.attention.torch_backend import TorchAttentionBackend
from llmserve.model_loader.loader import load_config, load_model

CPU = torch.device("cpu")
BLOCK_SIZE = 4
NUM_BLOCKS = 16


def load_tiny(path: Path) -> torch.nn.Module:
    """This rank's model (ranks from parallel_state), loaded and post-processed like the engine does."""
    return load_model(load_config(path), path, torch.float32, CPU)


def new_kv_cache(attn: Attention, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed key and value caches of ``attn``'s own (unshared) layout and cache dtype for a model in ``dtype``
    (one tensor twice where its values live in the key cache)."""
    shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
    key_cache = torch.zeros(shape, dtype=attn.kv_cache_dtype(dtype))
    return key_cache, key_cache if attn.values_in_key_cache else torch.zeros_like(key_cache)


def bind_cache(model: torch.nn.Module) -> TorchAttentionBackend:
    backend = TorchAttentionBackend(torch.float32)
    for attn in model.attention_layers():
        attn.bind_cache(backend, *new_kv_cache(attn, NUM_BLOCKS, BLOCK_SIZE))
    return backend


def step_metadata(backend: TorchAttentionBackend, context: int, new: int) -> object:
    """One sequence in blocks 0, 1, ...: ``new`` tokens after ``context`` cached ones (a decode if new == 1)."""
    total = context + new
    layout = BatchLayout(query_lens=[new], context_lens=[context], block_tables=[list(range(-(-total // BLOCK_SIZE)))],
                         slot_mapping=torch.arange(context, total), num_decodes=1 if new == 1 and context else 0,
                         block_size=BLOCK_SIZE)
    return backend.build_metadata(layout, CPU)


PROMPT = [5, 17, 301, 42, 7, 1999, 0, 64, 3]


@torch.inference_mode()
def prefill_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one fresh sequence, through a freshly bound KV cache."""
    backend = bind_cache(model)
    tokens, positions = torch.tensor(ids), torch.arange(len(ids))
    return model.compute_logits(model(tokens, positions, step_metadata(backend, 0, len(ids))))


def tensor_parallel_logits(path: Path, tp: int, ids: list[int], expert_parallel: bool = False) -> list[torch.Tensor]:
    """Each simulated TP rank's logits for ``ids`` (ranks as threads, real all-reduce/all-gather semantics);
    ``expert_parallel``: MoE layers distribute their experts over the ranks."""
    from tests.parallel_sim import as_rank, run_ranks, simulated_groups

    ranks = []
    for group in simulated_groups(tp):
        with as_rank(tp=group, expert_parallel=expert_parallel):
            ranks.append(load_tiny(path))
    return run_ranks([lambda m=m: prefill_logits(m, ids) for m in ranks])
