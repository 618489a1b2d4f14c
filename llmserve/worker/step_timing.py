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


@torch.inference_mode()
def measure_step_times(runner: ModelRunner, token_counts: list[int], repeats: int = 5) -> dict[str, list[float] | None]:
    """Least seconds (of ``repeats``: the others were slowed by whatever else ran) of a step of ``n`` one-token
    rows (:func:`decode_step`) for each ``n``, and of the draft model's forward over them. Called at
    start-up, before any request holds a block: it writes K/V into the pool's first ``n`` blocks, which hold
    nothing yet."""
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
    drafter = runner.drafter
    if drafter is None:
        return {"target": target, "draft": None}
    draft = [least_seconds(lambda n=n: drafter.propose(   # one forward: each row has room for one draft
        [0] * n, np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64),
        np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (runner.kv_cache_groups.num_groups, n, 1)),
        np.zeros(n, dtype=np.int64))) for n in token_counts]
    return {"target": target, "draft": draft}


def decode_step(runner: ModelRunner, n: int) -> torch.Tensor:
    """A step of ``n`` one-token decode rows (row ``i`` in block ``i``) run as the runner runs a real one: through
    the fused decode step where it takes the step (a step verifying drafts runs there too, each token as a row),
    greedy sampling. Returns the sampled ids."""
    block_size, groups = runner.block_size, runner.kv_cache_groups.num_groups
    rows = np.arange(n)
    tables = np.stack([rows.astype(np.int32).reshape(n, 1)] * groups)
    slots = np.stack([rows * block_size] * groups)
    layout = BatchLayout(query_lens=[1] * n, context_lens=[0] * n, block_tables=tables[0],
                         slot_mapping=torch.from_numpy(slots[0]).to(runner.device), num_decodes=n,
                         block_size=block_size)
    metadata = group_metadata(runner.backend, layout, tables, slots, runner.device)
    ids = torch.zeros(n, dtype=torch.long, device=runner.device)   # token 0 at position 0 in every row
    positions = torch.zeros_like(ids)
    hidden = runner.forward(layout, metadata, ids, positions, torch.ones_like(ids))
    logits = runner.model.compute_logits(hidden)
    greedy = SamplingRow(SamplingParams(temperature=0.0), [], [], None, None)
    return runner.sampler(logits, SamplingBatch.build([greedy] * n, runner.vocab_size, runner.device)).sampled_token_ids


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
