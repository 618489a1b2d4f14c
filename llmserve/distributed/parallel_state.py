"""Which rank this process is in the tensor- and pipeline-parallel groups, and their collectives.

Ranks are laid out as vLLM lays them out: ``rank = pp_rank * tp_size + tp_rank``, so the ranks of one
pipeline stage form a tensor-parallel group. Before :func:`init_distributed` (a single process) every
group is the trivial group of one rank whose collectives return their input, so layers and models call
them unconditionally.

On CPU (gloo), a tensor-parallel group whose ranks are all on this machine also gets a shared-memory
segment (:mod:`llmserve.distributed.shm_all_reduce`): its all-reduce and all-gather of a contiguous CPU
tensor go through it instead of gloo's TCP loopback, and a rank whose step fails can abort its peers'
waits there (:meth:`GroupCoordinator.abort_step`) instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llmserve.distributed.shm_all_reduce import ShmCommunicator, all_gather_json

logger = logging.getLogger(__name__)


@dataclass
class GroupCoordinator:
    """One process group: this process's rank in it, its size, and the collectives layers use."""

    rank: int = 0                       # rank within the group
    world_size: int = 1
    ranks: tuple[int, ...] = (0,)       # global ranks of the group's members
    group: object | None = None         # torch.distributed ProcessGroup; None for a group of one
    shm: ShmCommunicator | None = field(default=None, repr=False, compare=False)   # same-machine fast path

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.world_size - 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place; returns it."""
        if self.world_size > 1:
            shm = self.shm
            if shm is not None and shm.can_reduce(tensor):
                return shm.all_reduce(tensor)
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` (rank order)."""
        if self.world_size == 1:
            return tensor
        shm = self.shm
        if shm is not None and shm.can_gather(tensor):
            return shm.all_gather(tensor, dim)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """The group member ``src``'s ``tensor`` on every rank, in place; returns it. Through the shared-memory
        segment where it can gather (so a peer that fails the step can abort the wait), else gloo / NCCL."""
        if self.world_size > 1:
            shm = self.shm
            if shm is not None and shm.can_gather(tensor):
                tensor.copy_(shm.all_gather(tensor.unsqueeze(0), dim=0)[src])
            else:
                dist.broadcast(tensor, self.ranks[src], group=self.group)
        return tensor

    def all_gather_json(self, value: object) -> list:
        """Every rank's JSON-able ``value`` (rank order): for start-up agreements (nothing is pickled)."""
        if self.world_size == 1:
            return [value]
        return all_gather_json(value, self.group, self.world_size)

    def abort_step(self) -> None:
        """This rank failed the step: make the group's pending and next collectives raise
        :class:`~llmserve.distributed.shm_all_reduce.CollectiveAbortedError` on the other ranks. Only a
        shared-memory group can: a peer waiting in gloo (ranks on several machines, or on CUDA) waits until
        the executor's timeout, and the engine stops."""
        if self.world_size > 1 and self.shm is not None:
            self.shm.abort()

    def recover_after_failed_step(self) -> None:
        """Collective over the group after a failed step: the shared-memory counters agree again."""
        if self.world_size > 1 and self.shm is not None:
            self.shm.recover(self.group)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send to the member of rank ``dst`` within this group."""
        dist.send(tensor.contiguous(), self.ranks[dst], group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` from the member of rank ``src`` within this group."""
        dist.recv(tensor, self.ranks[src], group=self.group)
        return tensor


_TP = GroupCoordinator()
_PP = GroupCoordinator()
_EP = GroupCoordinator()


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_pp_group() -> GroupCoordinator:
    return _PP


def get_ep_group() -> GroupCoordinator:
    """The ranks a mixture-of-experts layer distributes its experts over: the TP group with expert parallelism
    (``--enable-expert-parallel``), else the trivial group (every rank holds every expert)."""
    return _EP


def init_distributed(rank: int, tp_size: int, pp_size: int, init_method: str, backend: str = "gloo",
                     enable_expert_parallel: bool = False) -> None:
    """Join the job's default group at ``init_method`` (``tcp://host:port``) and make the TP and PP groups
    (and, with ``enable_expert_parallel``, make the TP group the expert-parallel group too).

    Every rank must call this with the same sizes; ``backend`` is ``gloo`` on CPU and ``nccl`` on CUDA.
    """
    global _TP, _PP, _EP
    world_size = tp_size * pp_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} ranks")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    tp_rank, pp_rank = rank % tp_size, rank // tp_size
    # Every rank must create every group, in the same order, even those it is not part of.
    for stage in range(pp_size):
        ranks = tuple(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(list(ranks), backend=backend)
        if stage == pp_rank:
            _TP = GroupCoordinator(tp_rank, tp_size, ranks, group)
    if backend == "gloo" and tp_size > 1:
        _TP.shm = ShmCommunicator.create(_TP.group, tp_rank, tp_size)   # collective over the TP group
    for column in range(tp_size):
        ranks = tuple(range(column, world_size, tp_size))
        group = dist.new_group(list(ranks), backend=backend)
        if column == tp_rank:
            _PP = GroupCoordinator(pp_rank, pp_size, ranks, group)
    if enable_expert_parallel:
        _EP = _TP
    logger.debug("rank %d: tp %d/%d, pp %d/%d, ep %d", rank, tp_rank, tp_size, pp_rank, pp_size, _EP.world_size)


def destroy_distributed() -> None:
    """Leave the groups (a worker shutting down); the trivial groups of one rank apply again."""
    global _TP, _PP, _EP
    for coordinator in (_TP, _PP):
        if coordinator.shm is not None:
            coordinator.shm.close()
            coordinator.shm = None
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP, _PP, _EP = GroupCoordinator(), GroupCoordinator(), GroupCoordinator()
