"""Start-up timing of decode-like steps: adaptive speculation's cost model (:mod:`llmserve.spec_decode.adaptive`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from llmserve.worker.model_runner import ModelRunner


@torch.inference_mode()
def measure_step_times(runner: ModelRunner, token_counts: list[int], repeats: int = 5) -> dict[str, list[float] | None]:
    """Least seconds (of ``repeats``: the others were slowed by whatever else ran) of a step of ``n`` one-token
    rows (forward, logits, sampling) for each ``n``, and of the draft model's forward over them. Called at
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

    target = [least_seconds(lambda n=n: runner.run_worst_case_step([1] * n, n)) for n in token_counts]
    drafter = runner.drafter
    if drafter is None:
        return {"target": target, "draft": None}
    draft = [least_seconds(lambda n=n: drafter.propose(   # one forward: each row has room for one draft
        [0] * n, np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64),
        np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (runner.kv_cache_groups.num_groups, n, 1)),
        np.zeros(n, dtype=np.int64))) for n in token_counts]
    return {"target": target, "draft": draft}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
