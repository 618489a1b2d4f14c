"""The engine core: the scheduler and KV-cache manager on one side, the executor and its workers on the other.

One step is ``schedule`` -> ``executor.execute_model(SchedulerOutput)`` -> ``update_from_output``; the
messages are the only thing that crosses to the workers. The core knows token ids, never text: turning
tokens into outputs (detokenising, stop strings, logprobs) is the engine's output processing.
"""

from __future__ import annotations

import logging

from llmserve.config import EngineConfig
from llmserve.engine.block_manager import BlockManager
from llmserve.engine.messages import ModelRunnerOutput
from llmserve.engine.scheduler import Scheduler, StepResult
from llmserve.engine.sequence import Sequence
from llmserve.executor.abstract import Executor, executor_class

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, max_model_len: int, max_num_batched_tokens: int) -> None:
        self.executor: Executor = executor_class(config.executor_backend)(config, max_model_len,
                                                                          max_num_batched_tokens)
        try:
            num_blocks = self.executor.determine_num_kv_blocks()
            self.executor.initialize_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, max_num_batched_tokens,
                                   config.enable_chunked_prefill, max_model_len)
        tokens = num_blocks * config.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB per rank)", num_blocks,
                    config.block_size, tokens, num_blocks * self.executor.kv_cache_bytes_per_block() / 2**30)
        logger.info("Maximum concurrency for %d tokens per request: %.2fx", max_model_len, tokens / max_model_len)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)

    def step(self) -> StepResult:
        """Schedule, run and apply one step (nothing when there is nothing to compute)."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return self.scheduler.update_from_output(sched, ModelRunnerOutput())
        return self.scheduler.update_from_output(sched, self.executor.execute_model(sched))

    def shutdown(self) -> None:
        self.executor.shutdown()
