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


# A step of this many rows over this many context tokens gives attention's cost per token of context (capped by
# the pool's blocks).
CONTEXT_ROWS, CONTEXT_TOKENS = 16, 256


@torch.inference_mode()
def measure_step_times(runner: ModelRunner, token_counts: list[int], repeats: int = 5) -> dict[str, list[float] | None]:
    """Least seconds (of ``repeats``: the others were slowed by whatever else ran) of a step of ``n`` one-token
    rows over no context (:func:`decode_step`) for each ``n`` (``"target"``), of the draft model's forward over
    them (``"draft"``), and what each token of context adds per row (``"context_slope"``: seconds per row per
    context token, from :data:`CONTEXT_ROWS` rows over :data:`CONTEXT_TOKENS`). Called at start-up, before any
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
    rows = min(CONTEXT_ROWS, max(token_counts))
    context = min(CONTEXT_TOKENS, (runner.num_blocks // rows - 1) * runner.block_size)
    slope = 0.0
    if context > 0:   # seconds per token of a step per token of context it attends over
        at_context = least_seconds(lambda: decode_step(runner, rows, context))
        slope = max(0.0, at_context - least_seconds(lambda: decode_step(runner, rows))) / (rows * context)
    drafter = runner.drafter
    if drafter is None:
        return {"target": target, "draft": None, "context_slope": [slope]}
    draft = [least_seconds(lambda n=n: drafter.propose(   # one forward: each row has room for one draft
        [0] * n, np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64),
        np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (runner.kv_cache_groups.num_groups, n, 1)),
        np.zeros(n, dtype=np.int64))) for n in token_counts]
    return {"target": target, "draft": draft, "context_slope": [slope]}


def decode_step(runner: ModelRunner, n: int, context: int = 0) -> torch.Tensor:
    """A step of ``n`` one-token decode rows over ``context`` cached tokens each (row ``i`` in its own blocks,
    from block ``i * (context // block_size + 1)``), run as the runner runs a real one: through the fused decode
    step where it takes the step (a step verifying drafts runs there too, each token as a row), greedy sampling.
    Returns the sampled ids."""
    block_size, groups = runner.block_size, runner.kv_cache_groups.num_groups
    per_row = context // block_size + 1
    first = np.arange(n) * per_row
    tables = np.stack([(first[:, None] + np.arange(per_row)).astype(np.int32)] * groups)
    slots = np.stack([(first + per_row - 1) * block_size + context % block_size] * groups)
    layout = BatchLayout(query_lens=[1] * n, context_lens=[context] * n, block_tables=tables[0],
                         slot_mapping=torch.from_numpy(slots[0]).to(runner.device), num_decodes=n,
                         block_size=block_size)
    metadata = group_metadata(runner.backend, layout, tables, slots, runner.device)
    ids = torch.zeros(n, dtype=torch.long, device=runner.device)
    lengths = torch.full((n,), context + 1, dtype=torch.long, device=runner.device)
    hidden = runner.forward(layout, metadata, ids, ids, lengths)
    logits = runner.model.compute_logits(hidden)
    greedy = SamplingRow(SamplingParams(temperature=0.0), [], [], None, None)
    return runner.sampler(logits, SamplingBatch.build([greedy] * n, runner.vocab_size, runner.device)).sampled_token_ids


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
