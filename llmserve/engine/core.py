"""The engine core: the scheduler and KV-cache manager on one side, the executor and its workers on the other.

It takes :class:`~llmserve.engine.messages.EngineCoreRequest` s and aborts, and each ``step`` is
``schedule`` -> ``executor.execute_model(SchedulerOutput)`` -> ``update_from_output``, reported as
:class:`~llmserve.engine.messages.EngineCoreOutputs`. It knows token ids, never text: detokenising, stop
strings and output assembly are the front end's (:mod:`llmserve.engine.output_processor`), which may
live in this process (``LLM``) or another (the API server).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable

from llmserve.config import EngineConfig
from llmserve.engine.block_manager import BlockManager, most_blocks_held
from llmserve.engine.messages import (EngineCoreOutputs, EngineCoreRequest, ModelRunnerOutput, SampleOutput,
                                      SchedulerStats)
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.sequence import Sequence
from llmserve.executor.abstract import Executor, executor_class
from llmserve.spec_decode.adaptive import AdaptiveSpeculation, StepCostModel
from llmserve.spec_decode.proposer import make_proposer

logger = logging.getLogger(__name__)


def extra_hash_keys(request: EngineCoreRequest) -> bytes:
    """What besides its tokens keys a request's prefix-cache blocks: its ``cache_salt``, its KV variant (what else
    decides the keys its blocks hold) and its adapter (one adapter's K/V is never another's or the base model's).
    Each part present is tagged and length-prefixed, so no client-chosen salt can spell another request's keys (a
    salt equal to an adapter's key is still a salt); a request with none of them has none (b"")."""
    parts = ((b"salt", request.cache_salt.encode() if request.cache_salt else None),
             (b"kv", request.kv_variant.encode() if request.kv_variant else None),
             (b"lora", request.lora_request.hash_key() if request.lora_request is not None else None))
    return b"".join(b"%s:%d:%s" % (tag, len(value), value) for tag, value in parts if value is not None)


class EngineCore:
    def __init__(self, config: EngineConfig, max_model_len: int, max_num_batched_tokens: int,
                 report_stats: bool = False) -> None:
        """``report_stats``: attach the scheduler's stats to every step's outputs (a front end in another
        process reads them for /metrics; in process they are read on demand, and cost nothing per step)."""
        self.report_stats = report_stats
        for warning in config.flags_without_effect():
            logger.warning("%s", warning)
        self.executor: Executor = executor_class(config.executor_backend)(config, max_model_len,
                                                                          max_num_batched_tokens)
        try:
            num_blocks = self.executor.determine_num_kv_blocks()
            self.executor.initialize_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        windows = self.executor.kv_cache_group_windows()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, windows)
        spec = config.speculative_config
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, max_num_batched_tokens,
                                   config.enable_chunked_prefill, max_model_len,
                                   make_proposer(spec) if spec is not None else None,
                                   max_loras=config.max_loras if config.enable_lora else None,
                                   adaptive=self._adaptive_speculation(config, num_blocks, max_num_batched_tokens),
                                   num_scheduler_steps=config.num_scheduler_steps,
                                   multi_step_max_rows=(self.executor.multi_step_max_rows()
                                                        if config.num_scheduler_steps > 1 else None))
        self.requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self.num_steps = 0   # steps that ran a batch (how many steps an abort waited is counted against it)
        tokens = num_blocks * config.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB per rank)", num_blocks,
                    config.block_size, tokens, num_blocks * self.executor.kv_cache_bytes_per_block() / 2**30)
        held = most_blocks_held(config.block_size, windows, max_model_len, max_model_len, max_num_batched_tokens,
                                config.enable_chunked_prefill, self.scheduler.speculation.num_lookahead_slots)
        logger.info("Maximum concurrency for %d tokens per request: %.2fx", max_model_len, num_blocks / held)
        if len(windows) > 1:
            kinds = {w: windows.count(w) for w in windows}
            logger.info("KV-cache groups (one block table each, one pool): %s; a sliding group frees the blocks "
                        "that left its window", ", ".join(f"{n} {'full' if w is None else f'with window {w}'}"
                                                          for w, n in kinds.items()))
        elif windows[0] is not None:
            logger.info("Every attention layer slides (window %d tokens): a sequence holds at most %d blocks while "
                        "it decodes; older ones are freed", windows[0], -(-(windows[0] - 1) // config.block_size) + 1)

    def _adaptive_speculation(self, config: EngineConfig, num_blocks: int,
                              max_num_batched_tokens: int) -> AdaptiveSpeculation | None:
        """With ``adaptive`` speculation, its step-cost model: steps of 1, 2, 4, ... one-token rows timed on
        the workers, up to the most tokens a step of ``max_num_seqs`` sequences with ``k`` drafts each takes."""
        spec = config.speculative_config
        if spec is None or not spec.adaptive:
            return None
        largest = min(config.max_num_seqs * (1 + spec.num_speculative_tokens), max_num_batched_tokens, num_blocks)
        counts = sorted({min(2 ** i, largest) for i in range(largest.bit_length() + 1)})
        times = self.executor.measure_step_times(counts)
        logger.info("Adaptive speculation: step times of %s tokens: %s ms", counts,
                    ", ".join(f"{1000 * t:.2f}" for t in times["target"]))
        logger.info("Adaptive speculation: a token attends over its context at %.3f us per 1,000 tokens",
                    1e9 * times["context"][0])
        cost = StepCostModel(counts, times["target"], times["draft"], times["context"][0])
        return AdaptiveSpeculation(cost, spec.num_speculative_tokens)

    # ------------------------------------------------------------------ requests
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request's first sample; samples 2..n fork from it once its prompt is computed."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine core")
        if request.pooling is not None and request.params.n != 1:
            raise ValueError(f"pooling request {request.request_id!r} has n={request.params.n}; it pools one vector")
        seqs = [Sequence(next(self._seq_ids), request.request_id, index, request.prompt_token_ids, request.params,
                         request.max_tokens, request.eos_token_id, arrival_time=request.arrival_time,
                         extra_hash_keys=extra_hash_keys(request), pooling=request.pooling,
                         lora_request=request.lora_request)
                for index in range(request.params.n)]
        seqs[0].pending_forks = seqs[1:]
        self.requests[request.request_id] = seqs
        self.scheduler.add(seqs[0])

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or one of its samples, e.g. on a stop string) and free its blocks; unknown ids are
        ignored (it may have finished in the step that crossed the abort)."""
        seqs = self.requests.get(request_id)
        if seqs is None:
            return
        for seq in seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                seq.finish_reason = seq.finish_reason or "abort"
                self.scheduler.finish(seq)
        if all(seq.is_finished for seq in seqs):
            del self.requests[request_id]

    def is_unfinished(self, request_id: str, index: int | None = None) -> bool:
        """Whether the request (or its sample ``index``) still has a sequence that may hold KV blocks."""
        return any(not seq.is_finished and (index is None or seq.index == index)
                   for seq in self.requests.get(request_id, ()))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> EngineCoreOutputs:
        """Schedule, run and apply one step (nothing runs when there is nothing to compute)."""
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self.scheduler.update_from_output(sched, ModelRunnerOutput())
            return EngineCoreOutputs()   # nothing ran
        result = self.executor.execute_model(sched)
        step = self.scheduler.update_from_output(sched, result)
        self.scheduler.speculation.observe_step_time(time.perf_counter() - start)
        self.num_steps += 1
        # (a multi-step step computed each row's earlier tokens too)
        computed = sched.total_num_scheduled_tokens + sum(map(len, result.multi_step_tokens.values()))
        out = EngineCoreOutputs(failed=step.failed, num_scheduled_tokens=computed)
        for request_id in step.failed:
            self.abort(request_id)
        for seq, start, entries in step.prompt_logprobs:
            out.prompt_logprobs.append((seq.request_id, start, entries))
        for seq, vector in step.pooled:
            out.pooled[seq.request_id] = vector
            self.requests.pop(seq.request_id, None)
        last_seq = None
        for seq, token, token_logprobs in step.sampled:
            if seq is last_seq:   # accepted drafts, multi-step tokens: a sequence's tokens of a step go out together
                out.samples[-1].new_token_ids.append(token)
                if token_logprobs is not None:
                    out.samples[-1].logprobs.append(token_logprobs)
                continue
            last_seq = seq
            out.samples.append(SampleOutput(
                seq.request_id, seq.index, [] if token is None else [token],
                [token_logprobs] if token_logprobs is not None else [],
                seq.finish_reason, seq.stop_reason, seq.first_scheduled_time, seq.first_token_time,
                seq.last_token_time, seq.num_preemptions, seq.num_cached_tokens))
            if seq.is_finished:
                seqs = self.requests.get(seq.request_id)
                if seqs is not None and all(s.is_finished for s in seqs):
                    del self.requests[seq.request_id]
        if self.report_stats:
            out.stats = self.stats()
        return out

    # ------------------------------------------------------------------ stats
    def stats(self) -> SchedulerStats:
        running = len({seq.request_id for seq in self.scheduler.running.values()})
        lora = self.scheduler.adapters.max_loras is not None
        allocated, filled = self.block_manager.waste(list(self.scheduler.running.values()))
        spec = self.scheduler.spec_stats
        return SchedulerStats(
            num_requests_running=running,
            num_requests_waiting=len(self.requests) - running,
            kv_cache_usage=self.block_manager.usage,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_blocks=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.block_manager.prefix_query_tokens,
            prefix_cache_hits=self.block_manager.prefix_hit_tokens,
            kv_cache_waste=(allocated - filled) / allocated if allocated else 0.0,
            spec_num_drafts=spec.num_drafts,
            spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
            spec_num_accepted_tokens_per_pos=list(spec.num_accepted_tokens_per_pos),
            running_lora_adapters=_adapter_names(self.scheduler.running.values()) if lora else [],
            waiting_lora_adapters=_adapter_names(self.scheduler.waiting) if lora else [],
        )

    def shutdown(self) -> None:
        self.executor.shutdown()


def _adapter_names(seqs: Iterable[Sequence]) -> list[str]:
    return sorted({seq.lora_request.lora_name for seq in seqs if seq.lora_request is not None})
