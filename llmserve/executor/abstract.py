"""The executor interface: how the engine core drives its workers, wherever they run.

Every rank gets the same calls in the same order; only the driver rank's answer to ``execute_model``
comes back. ``uni`` keeps one worker in the engine's process, ``mp`` runs one process per rank on this
machine, ``ray`` places them across a Ray cluster.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from llmserve.config import EngineConfig
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput

EXECUTOR_BACKENDS = ("uni", "mp", "ray")


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
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks on every rank (and capture CUDA graphs where they are used)."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; the driver's output. A step that failed comes back with ``error`` set;
        a worker that died or hung raises :class:`WorkerDiedError`."""

    def shutdown(self) -> None:
        """Stop the workers (a no-op in process)."""


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
