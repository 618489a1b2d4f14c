"""Start-up timing of decode-like steps: adaptive speculation's cost model (:mod:`llmserve.spec_decode.adaptive`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from llmserve.layers.attention.backend import BatchLayout
from llmserve.layers.sampling_batch import SamplingBatch, SamplingRow
from llmserve.sampling_params import SamplingParams
from llmserve.worker.kv_cache_groups import group_metadata
from llmserve.worker.model_runner import ModelRunner


# Attention's cost per token of context: CONTEXT_ROWS rows of CONTEXT_QUERY tokens each (a verifying step's shape:
# a row's tokens read one context) over each of CONTEXTS cached tokens.
CONTEXT_ROWS, CONTEXT_QUERY, CONTEXTS = 8, 4, (16, 272)


@torch.inference_mode()
def measure_step_times(runner: ModelRunner, token_counts: list[int], max_model_len: int,
                       repeats: int = 5) -> dict[str, list[float] | None]:
    """Least seconds (of ``repeats``: the others were slowed by whatever else ran) of a step of ``n`` one-token
    rows (:func:`decode_step`) for each ``n`` (``"target"``), of the draft model's forward over them
    (``"draft"``), and (``"context"``, one value) the seconds a step's token adds per token of context it
    attends over (0 where ``max_model_len`` leaves no room for the measurement). Called at start-up, before any
    request holds a block: it writes K/V into the pool's first blocks, which hold nothing yet."""
    if max(token_counts) > runner.num_blocks:
        raise ValueError(f"measuring a {max(token_counts)}-row step needs as many KV blocks, {runner.num_blocks} "
                         f"are bound")

    def least_seconds(run: Callable[[], object]) -> float:
        run()   # warm-up
        times = []
        for _ in range(repeats):
            _synchronize(runner.device)
            start = time.perf_counter()
            run()
            _synchronize(runner.device)
            times.append(time.perf_counter() - start)
        return min(times)

    target = [least_seconds(lambda n=n: decode_step(runner, n)) for n in token_counts]
    short, long = CONTEXTS
    blocks = CONTEXT_ROWS * -(-(long + CONTEXT_QUERY) // runner.block_size)
    context = 0.0
    if long + CONTEXT_QUERY <= max_model_len and blocks <= runner.num_blocks:
        over = [least_seconds(lambda c=c: decode_step(runner, CONTEXT_ROWS, CONTEXT_QUERY, c)) for c in CONTEXTS]
        context = max(0.0, (over[1] - over[0]) / (CONTEXT_ROWS * CONTEXT_QUERY * (long - short)))
    drafter = runner.drafter
    if drafter is None:
        return {"target": target, "draft": None, "context": [context]}
    draft = [least_seconds(lambda n=n: drafter.propose(   # one forward: each row has room for one draft
        [[0]] * n, np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64),
        np.tile(np.arange(n, dtype=np.int32)[None, :, None], (runner.kv_cache_groups.num_groups, 1, 1)),
        np.zeros(n, dtype=np.int64))) for n in token_counts]
    return {"target": target, "draft": draft, "context": [context]}


def decode_step(runner: ModelRunner, n: int, query_len: int = 1, context: int = 0) -> torch.Tensor:
    """A step of ``n`` rows of ``query_len`` tokens over ``context`` cached tokens each (row ``i`` in blocks
    ``i * w .. (i + 1) * w - 1``, ``w`` the blocks a row spans), run as the runner runs a real one: through the fused
    decode step where it takes the step (one-token rows, and rows verifying drafts over a context), greedy
    sampling. Returns the sampled ids."""
    block_size, groups = runner.block_size, runner.kv_cache_groups.num_groups
    width = -(-(context + query_len) // block_size)
    tables = np.arange(n * width, dtype=np.int32).reshape(n, width)
    offsets = context + np.arange(query_len)
    slots = (tables[:, :1] * block_size + offsets[None, :]).reshape(-1)
    layout = BatchLayout(query_lens=[query_len] * n, context_lens=[context] * n, block_tables=tables,
                         slot_mapping=torch.from_numpy(slots).to(runner.device),
                         num_decodes=n if query_len == 1 else 0, block_size=block_size)
    metadata = group_metadata(runner.backend, layout, np.stack([tables] * groups), np.stack([slots] * groups),
                              runner.device)
    ids = torch.zeros(n * query_len, dtype=torch.long, device=runner.device)   # token 0 in every slot
    positions = torch.from_numpy(np.tile(offsets, n)).to(runner.device)
    hidden = runner.forward(layout, metadata, ids, positions, positions + 1)
    logits = runner.model.compute_logits(hidden)
    greedy = SamplingRow(SamplingParams(temperature=0.0), [], [], None, None)
    return runner.sampler(logits, SamplingBatch.build([greedy] * (n * query_len), runner.vocab_size,
                                                      runner.device)).sampled_token_ids


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
