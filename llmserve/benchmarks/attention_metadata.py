"""Per-step cost of the attention metadata of a model with several KV-cache groups.

``python -m llmserve.benchmarks.attention_metadata`` builds one step's metadata as the model runner does
(:func:`llmserve.worker.kv_cache_groups.group_metadata`) for a Gemma 3-shaped model: ``--groups`` groups, all
sliding (``--window`` tokens) but the last, which is full. Each group then builds what its layers' first forward
builds (the PyTorch and CPU backends derive their decode and prefill pieces for a window on first use), so the
figure is the metadata work of a whole step. The batch has ``--rows`` rows: decodes of random contexts up to
``--max-context`` tokens, and ``--prefills`` of them prefill chunks of ``--chunk`` tokens over such contexts.
It prints one line per backend (``torch``, ``cpu``, ``triton`` when it imports): the median microseconds per
step over ``--repeats`` runs of ``--number`` steps each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import timeit

import numpy as np
import torch

from llmserve.layers.attention.backend import AttentionBackend, BatchLayout, KVCacheGroupMetadata, triton_available
from llmserve.worker.kv_cache_groups import group_metadata

CPU = torch.device("cpu")


def step_inputs(rows: int, prefills: int, chunk: int, max_context: int, groups: int, block_size: int,
                seed: int = 0) -> tuple[BatchLayout, np.ndarray, np.ndarray]:
    """A step's layout (the first group's tables and slots) and every group's ``[groups, ...]`` tables and slots:
    each group's blocks are distinct ids of one pool, as the block manager hands them out."""
    rng = random.Random(seed)
    num_decodes = rows - prefills
    context_lens = [rng.randint(1, max_context) for _ in range(rows)]
    query_lens = [1] * num_decodes + [chunk] * prefills
    width = max(-(-(c + q) // block_size) for c, q in zip(context_lens, query_lens))
    ids = np.arange(groups * rows * width, dtype=np.int32)
    tables = ids.reshape(groups, rows, width)
    slots = np.concatenate([
        np.stack([tables[g, i, p // block_size] * block_size + p % block_size
                  for i, (c, q) in enumerate(zip(context_lens, query_lens)) for p in range(c, c + q)])
        for g in range(groups)]).reshape(groups, -1).astype(np.int64)
    layout = BatchLayout(query_lens=query_lens, context_lens=context_lens, block_tables=tables[0],
                         slot_mapping=torch.from_numpy(slots[0]), num_decodes=num_decodes, block_size=block_size)
    return layout, tables, slots


def build_step(backend: AttentionBackend, layout: BatchLayout, tables: np.ndarray, slots: np.ndarray,
               windows: list[int | None]) -> object:
    """The step's metadata per group, with each group's window pieces built as its first layer builds them."""
    metadata = group_metadata(backend, layout, tables, slots, CPU)
    per_group = metadata if isinstance(metadata, KVCacheGroupMetadata) else [metadata]
    for group, window in zip(per_group, windows):
        if hasattr(group, "decodes_for"):   # the PyTorch and CPU backends build these lazily
            w = group.window(window)
            if layout.num_decodes:
                group.decodes_for(w)
            if len(layout.query_lens) > layout.num_decodes:
                group.prefills_for(w)
    return metadata


def backends() -> list[AttentionBackend]:
    from llmserve.layers.attention.backend import get_attention_backend

    found = [get_attention_backend(CPU, torch.float32, "torch")]
    try:
        found.append(get_attention_backend(CPU, torch.float32, "cpu"))
    except RuntimeError:
        pass
    if triton_available():
        from llmserve.layers.attention.triton_backend import TritonAttentionBackend

        found.append(TritonAttentionBackend(torch.float32, num_kv_heads=4))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prefills", type=int, default=0, help="rows that are prefill chunks (the rest decode)")
    parser.add_argument("--chunk", type=int, default=64, help="tokens of each prefill chunk")
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--groups", type=int, default=6, help="KV-cache groups (Gemma 3: 5 sliding, 1 full)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--number", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layout, tables, slots = step_inputs(args.rows, args.prefills, args.chunk, args.max_context, args.groups,
                                        args.block_size)
    windows = [args.window] * (args.groups - 1) + [None]
    for backend in backends():
        times = timeit.repeat(lambda: build_step(backend, layout, tables, slots, windows), number=args.number,
                              repeat=args.repeats)
        print(f"{backend.name:7s} {args.groups} groups, {args.rows} rows ({args.prefills} prefill chunks): "
              f"{1e6 * statistics.median(times) / args.number:9.1f} us per step")


if __name__ == "__main__":
    main()
