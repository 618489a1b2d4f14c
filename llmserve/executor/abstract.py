"""The executor interface: how the engine core drives its workers, wherever they run.

Every rank gets the same calls in the same order; only the driver rank's answer to ``execute_model``
comes back. ``uni`` keeps one worker in the engine's process, ``mp`` runs one process per rank on this
machine, ``ray`` places them across a Ray cluster.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from llmserve.config import EngineConfig
from llmserve.distributed.shm_all_reduce import CollectiveAbortedError
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput, decode

EXECUTOR_BACKENDS = ("uni", "mp", "ray")
EXECUTE_TIMEOUT_ENV = "LLMSERVE_EXECUTE_MODEL_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 1800.0   # loading a large checkpoint from a slow disk
T = TypeVar("T")


class WorkerDiedError(RuntimeError):
    """A worker process exited or stopped answering: the engine cannot go on."""


class Executor(ABC):
    def __init__(self, config: EngineConfig, max_model_len: int, max_num_batched_tokens: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens

    @abstractmethod
    def determine_num_kv_blocks(self) -> int:
        """The number of KV blocks every rank can hold (the smallest rank decides)."""

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one block takes on one rank (its share of the layers and heads)."""

    @abstractmethod
    def kv_cache_group_windows(self) -> list[int | None]:
        """Each KV-cache group's window (None: full attention), the same on every rank: the block manager keeps
        a block table per group and frees the blocks that left a sliding group's window."""

    @abstractmethod
    def multi_step_max_rows(self) -> int | None:
        """The most rows a multi-step step runs in the workers' compiled loop (None: any number; asked only with
        ``--num-scheduler-steps`` above 1): the scheduler makes wider steps plain ones."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks on every rank (and capture CUDA graphs where they are used)."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; the driver's output. A step that failed comes back with ``error`` set;
        a worker that died or hung raises :class:`WorkerDiedError`."""

    @abstractmethod
    def measure_step_times(self, token_counts: list[int]) -> dict[str, list[float] | None]:
        """The driver's seconds per decode-like step of each of ``token_counts`` one-token rows (``"target"``),
        of the draft model's forward over them (``"draft"``, None without one) and, as one value, per token and
        token of context it attends over (``"context"``); every rank runs them."""

    def shutdown(self) -> None:
        """Stop the workers (a no-op in process)."""


def ready_bodies(replies: list[bytes]) -> list[bytes]:
    """The bodies of every rank's ``R`` reply (see ``worker_process``); anything else is a rank that cannot go on."""
    for rank, reply in enumerate(replies):
        if reply[:1] != b"R":
            raise WorkerDiedError(f"worker rank {rank} failed: {reply[1:].decode(errors='replace')}")
    return [reply[1:] for reply in replies]


class MultiRankExecutor(Executor):
    """What the executors of several ranks share: control calls answered by every rank, the driver's step
    output, and a dead engine staying dead. Subclasses carry the bytes (``_control_replies``, ``_step_replies``)."""

    def __init__(self, config: EngineConfig, max_model_len: int, max_num_batched_tokens: int) -> None:
        super().__init__(config, max_model_len, max_num_batched_tokens)
        self.world_size = config.world_size
        self.driver_rank = (config.pipeline_parallel_size - 1) * config.tensor_parallel_size
        self.execute_timeout = float(os.environ.get(EXECUTE_TIMEOUT_ENV, "300"))
        self.dead: str | None = None   # why the engine is dead, once a worker died, hung or failed for good

    @abstractmethod
    def _control_replies(self, method: str, args: list[Any]) -> list[bytes]:
        """Call ``method`` on every rank's worker; the replies in rank order."""

    @abstractmethod
    def _step_replies(self, sched: SchedulerOutput) -> list[bytes]:
        """Run one step on every rank; the replies in rank order."""

    def _guarded(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, the workers' calls of every entry point. The first :class:`WorkerDiedError` kills
        every worker left (one may hang in a collective on its dead peer) and leaves the engine dead: each
        later call raises at once with that cause, instead of writing to closed pipes or reading replies that
        belong to an earlier call."""
        if self.dead is not None:
            raise WorkerDiedError(f"the engine is dead: {self.dead}")
        try:
            return call(*args)
        except WorkerDiedError as exc:
            self._die(exc)

    def _die(self, exc: WorkerDiedError) -> NoReturn:
        """Leave the engine dead with ``exc``'s cause, stop every worker left, and raise ``exc``."""
        self.dead = str(exc)
        self.shutdown()
        raise exc

    def _control(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every rank's worker; the JSON results in rank order."""
        replies = self._guarded(self._control_replies, method, list(args))
        return [json.loads(body) for body in self._guarded(ready_bodies, replies)]

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.step_output(self._guarded(self._step_replies, sched))

    def determine_num_kv_blocks(self) -> int:
        return min(self._control("available_kv_blocks"))

    def kv_cache_bytes_per_block(self) -> int:
        return max(self._control("kv_cache_bytes_per_block"))

    def kv_cache_group_windows(self) -> list[int | None]:
        reported = self._control("kv_cache_group_windows")
        # Pipeline stages form their groups from every stage's layers: all ranks agree.
        if any(windows != reported[0] for windows in reported):
            raise RuntimeError(f"the ranks disagree on the KV-cache groups' windows: {reported}")
        return reported[0]

    def multi_step_max_rows(self) -> int | None:
        return self._control("multi_step_max_rows")[self.driver_rank]

    def initialize_cache(self, num_blocks: int) -> None:
        self._control("initialize_cache", num_blocks)

    def measure_step_times(self, token_counts: list[int]) -> dict[str, list[float] | None]:
        return self._control("measure_step_times", token_counts)[self.driver_rank]

    def step_output(self, replies: list[bytes]) -> ModelRunnerOutput:
        """Every rank's reply to a step -> the driver's output, or the failure. A step that failed on any rank
        failed on all (the failing rank aborted its peers' collectives, see ``ModelRunner.fail_step``); the
        ranks then line up their collectives again before the next step, and the error reported is the one
        that caused the failure, not a peer's aborted wait."""
        errors = [reply[1:].decode(errors="replace") for reply in replies if reply[:1] == b"X"]
        if errors:
            self._control("recover_after_failed_step")
            causes = [e for e in errors if not e.startswith(CollectiveAbortedError.__name__)]
            return ModelRunnerOutput(error=(causes or errors)[0])
        reply = replies[self.driver_rank]
        if reply[:1] != b"O":
            self._die(WorkerDiedError(f"driver rank {self.driver_rank} answered {reply[:1]!r} to a step"))
        return decode(reply[1:], ModelRunnerOutput)


def executor_class(backend: str) -> type[Executor]:
    if backend == "uni":
        from llmserve.executor.uniproc import UniProcExecutor

        return UniProcExecutor
    if backend == "mp":
        from llmserve.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor
    if backend == "ray":
        from llmserve.executor.ray_executor import RayExecutor

        return RayExecutor
    raise ValueError(f"--distributed-executor-backend must be one of {', '.join(EXECUTOR_BACKENDS)}, got {backend!r}")
