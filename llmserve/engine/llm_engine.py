"""The synchronous engine: input processing, the engine core in this process, and output processing.

``add_request`` tokenises, validates and queues; ``step`` runs one step of the
:class:`~llmserve.engine.core.EngineCore` (schedule, execute on the workers, update) and turns the token
ids it produced into request outputs (:class:`~llmserve.engine.output_processor.OutputProcessor`). The
offline ``LLM`` drives it; the API server puts the same core in a process of its own
(:mod:`llmserve.engine.core_client`) and keeps the two processors on its side.

Tokenising happens on the caller's thread and detokenising on the thread that steps, so each has its own
tokenizer instance: a Hugging Face fast tokenizer is not safe to use from two threads at once.
"""

from __future__ import annotations

import logging
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine.block_manager import BlockManager
from llmserve.engine.core import EngineCore
from llmserve.engine.input_processor import InputProcessor, ModelInfo
from llmserve.engine.messages import AbortDelay, SchedulerStats
from llmserve.engine.output_processor import AnyRequestOutput, OutputKind, OutputProcessor, RequestState
from llmserve.engine.scheduler import Scheduler
from llmserve.errors import InvalidRequestError
from llmserve.lora.request import LoRARequest
from llmserve.pooling_params import PoolingParams
from llmserve.sampling_params import SamplingParams
from llmserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "OutputKind", "RequestState"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.info = ModelInfo(config)
        self.core = EngineCore(config, self.info.max_model_len, self.info.max_num_batched_tokens)
        self.info.log_dtype_choice()
        self.inputs = InputProcessor(self.info, self.core.block_manager.num_blocks, config.block_size,
                                     self.core.block_manager.group_windows)
        # the stepping thread's own instance
        self.outputs = OutputProcessor(self.info.load_tokenizer(), config.stream_interval)

    # ------------------------------------------------------------------ what the model is
    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    @property
    def model_path(self) -> Any:
        return self.info.model_path

    @property
    def hf_config(self) -> Any:
        return self.info.hf_config

    @property
    def dtype(self) -> Any:
        return self.info.dtype

    @property
    def device(self) -> Any:
        return self.info.device

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self.info.eos_token_id

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def max_num_batched_tokens(self) -> int:
        return self.info.max_num_batched_tokens

    # ------------------------------------------------------------------ the core's parts (in process)
    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def block_manager(self) -> BlockManager:
        return self.core.block_manager

    @property
    def runner(self) -> ModelRunner:
        """The model runner, when it runs in this process (the ``uni`` executor)."""
        worker = getattr(self.core.executor, "worker", None)
        if worker is None or worker.runner is None:
            raise AttributeError("the model runs in worker processes; there is no runner in this process")
        return worker.runner

    def shutdown(self) -> None:
        """Stop the workers (worker processes exit; in process, nothing to do)."""
        self.core.shutdown()

    # ------------------------------------------------------------------ requests
    @property
    def requests(self) -> dict[str, RequestState]:
        return self.outputs.requests

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | PoolingParams | None = None, arrival_time: float | None = None,
                    output_kind: OutputKind = OutputKind.CUMULATIVE, cache_salt: str | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Validate and queue a request (with :class:`PoolingParams`: pool its prompt instead of completing it);
        raises :class:`InvalidRequestError` (and queues nothing) if it is bad."""
        self.enqueue(self.prepare_request(request_id, prompt, params, arrival_time, output_kind, cache_salt,
                                          lora_request))

    def prepare_request(self, request_id: str, prompt: str | list[int],
                        params: SamplingParams | PoolingParams | None = None, arrival_time: float | None = None,
                        output_kind: OutputKind = OutputKind.CUMULATIVE, cache_salt: str | None = None,
                        lora_request: LoRARequest | None = None) -> RequestState:
        """Tokenise and validate without touching the engine's state, so a front end can do it on its own
        thread; raises :class:`InvalidRequestError` naming the field. Requests with a ``cache_salt`` share
        prefix-cache blocks only with requests of the same salt (vLLM's field of that name); ``lora_request``
        runs it with that adapter (``enable_lora``)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        prompt_text, request = self.inputs.process(request_id, prompt, params, arrival_time, cache_salt,
                                                   lora_request)
        return self.outputs.make_state(prompt_text, request, output_kind)

    def enqueue(self, state: RequestState) -> None:
        """Queue a prepared request for scheduling."""
        if state.request_id in self.requests:
            raise InvalidRequestError(f"request id {state.request_id!r} is already in use", "request_id")
        self.core.add_request(state.core_request)
        self.outputs.add(state)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        return self.abort(request_id) is not None

    def abort(self, request_id: str) -> AnyRequestOutput | None:
        """Like :meth:`abort_request`, returning the request's final output (finish_reason ``"abort"``, with
        whatever it had not reported yet) so that stats can count it; None if unknown or already finished."""
        output = self.outputs.abort(request_id)
        self.core.abort(request_id)
        return output

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[AnyRequestOutput]:
        """Run one scheduling step; return outputs for requests that progressed (per their output kind)."""
        core_outputs = self.core.step()
        outputs, stopped = self.outputs.process(core_outputs)
        for request_id, index in stopped:
            self.core.abort(request_id, index)
        for request_id, message in core_outputs.failed.items():
            logger.error("model failed on request %s: %s", request_id, message)
        return outputs

    # ------------------------------------------------------------------ stats
    @property
    def num_generation_tokens_total(self) -> int:
        return self.outputs.num_generation_tokens_total

    def kv_cache_waste(self) -> float:
        """Slots allocated to running sequences but not holding computed tokens, over slots allocated."""
        return self.core.stats().kv_cache_waste

    def stats(self) -> dict[str, Any]:
        return stats_dict(self.core.stats(), self.outputs)


def stats_dict(core: SchedulerStats, outputs: OutputProcessor, iteration_tokens: list[int] | None = None,
               aborts: list[AbortDelay] | None = None) -> dict[str, Any]:
    """The engine's stats as /metrics reads them: the core's gauges, the front end's token counters and,
    when they come with the core's messages, the tokens each of their steps computed (0: nothing ran) and
    the aborts the core applied since its previous message."""
    return {
        "iteration_tokens": iteration_tokens or [],
        "aborts": aborts or [],
        "num_requests_running": core.num_requests_running,
        # the core's figures may be a step older than the front end's (an abort, a stop string)
        "num_requests_waiting": max(0, len(outputs.requests) - core.num_requests_running),
        "kv_cache_usage": core.kv_cache_usage,
        "num_free_blocks": core.num_free_blocks,
        "num_blocks": core.num_blocks,
        "num_preemptions": core.num_preemptions,
        "prefix_cache_queries": core.prefix_cache_queries,
        "prefix_cache_hits": core.prefix_cache_hits,
        "kv_cache_waste": core.kv_cache_waste,
        "spec_num_drafts": core.spec_num_drafts,
        "spec_num_draft_tokens": core.spec_num_draft_tokens,
        "spec_num_accepted_tokens": core.spec_num_accepted_tokens,
        "spec_num_accepted_tokens_per_pos": core.spec_num_accepted_tokens_per_pos,
        "running_lora_adapters": core.running_lora_adapters,
        "waiting_lora_adapters": core.waiting_lora_adapters,
        "prompt_tokens": outputs.num_prompt_tokens_total,
        "generation_tokens": outputs.num_generation_tokens_total,
    }
