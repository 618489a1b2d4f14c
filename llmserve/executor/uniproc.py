"""One worker in the engine's own process: no copies, no messages encoded, one rank."""

from __future__ import annotations

import logging

from llmserve.config import EngineConfig
from llmserve.engine.messages import ModelRunnerOutput, SchedulerOutput
from llmserve.executor.abstract import Executor
from llmserve.worker.worker import Worker, WorkerPlacement

logger = logging.getLogger(__name__)


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, max_model_len: int, max_num_batched_tokens: int) -> None:
        super().__init__(config, max_model_len, max_num_batched_tokens)
        if config.tensor_parallel_size * config.pipeline_parallel_size != 1:
            raise ValueError("the uni executor runs one rank; use --distributed-executor-backend mp or ray "
                             "for tensor or pipeline parallelism")
        self.worker = Worker(config, WorkerPlacement(), max_model_len, max_num_batched_tokens)
        self.worker.init_device()
        self.worker.load_model()

    def determine_num_kv_blocks(self) -> int:
        return self.worker.available_kv_blocks()

    def kv_cache_bytes_per_block(self) -> int:
        return self.worker.kv_cache_bytes_per_block()

    def kv_cache_group_windows(self) -> list[int | None]:
        return self.worker.kv_cache_group_windows()

    def multi_step_max_rows(self) -> int | None:
        return self.worker.multi_step_max_rows()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def measure_step_times(self, token_counts: list[int]) -> dict[str, list[float] | None]:
        return self.worker.measure_step_times(token_counts)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        try:
            output = self.worker.execute_model(sched)
        except Exception as exc:   # noqa: BLE001 - the scheduler isolates the request it fails on
            logger.warning("model step failed: %s: %s", type(exc).__name__, exc)
            return ModelRunnerOutput(error=f"{type(exc).__name__}: {exc}")
        assert output is not None
        return output
