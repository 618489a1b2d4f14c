"""Tensor/pipeline parallelism simulated in one process, for layer and model tests.

Layers and models read their ranks from ``parallel_state`` when they are built; :func:`as_rank`
swaps in a group for the duration of a build. :class:`SimulatedGroup` runs every rank as a thread of
this process and implements the collectives with a barrier, so a test can check that the ranks'
shards, composed through real all-reduce/all-gather semantics, equal the unsharded layer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from llmserve.distributed import parallel_state
from llmserve.distributed.parallel_state import GroupCoordinator


@contextmanager
def as_rank(tp: Any = None, pp: Any = None, expert_parallel: bool = False) -> Iterator[None]:
    """Build under these TP / PP groups (a GroupCoordinator or a stand-in), restoring the old ones after; with
    ``expert_parallel`` the TP group is also the expert-parallel group (``--enable-expert-parallel``)."""
    old_tp, old_pp, old_ep = parallel_state._TP, parallel_state._PP, parallel_state._EP
    parallel_state._TP = tp if tp is not None else old_tp
    parallel_state._PP = pp if pp is not None else old_pp
    if expert_parallel:
        parallel_state._EP = parallel_state._TP
    try:
        yield
    finally:
        parallel_state._TP, parallel_state._PP, parallel_state._EP = old_tp, old_pp, old_ep


def shape_only_group(rank: int, world_size: int) -> GroupCoordinator:
    """A group that knows its rank and size but cannot communicate (for building and loading)."""
    return GroupCoordinator(rank, world_size, tuple(range(world_size)), None)


class _Hub:
    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()   # nobody overwrites a slot before every rank has read them all
        return parts  # type: ignore[return-value]


class SimulatedGroup(GroupCoordinator):
    """Rank ``rank`` of ``world_size`` ranks that run as threads sharing one hub."""

    def __init__(self, rank: int, world_size: int, hub: _Hub) -> None:
        super().__init__(rank, world_size, tuple(range(world_size)), None)
        self.hub = hub

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self.hub.exchange(self.rank, tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat(self.hub.exchange(self.rank, tensor), dim=dim)


def simulated_groups(world_size: int) -> list[SimulatedGroup]:
    hub = _Hub(world_size)
    return [SimulatedGroup(rank, world_size, hub) for rank in range(world_size)]


def run_ranks(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run ``fns[r]`` for every rank r concurrently (one thread each); return their results in rank order."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            with torch.inference_mode():
                results[rank] = fns[rank]()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results
