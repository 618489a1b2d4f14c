"""The synchronous engine: input processing, the engine core, and output processing.

``add_request`` tokenises, validates and queues; ``step`` runs one step of the
:class:`~llmserve.engine.core.EngineCore` (schedule, execute on the workers, update) and turns the
tokens it produced into request outputs: logprobs, detokenised text, stop strings. Front ends (``LLM``,
the API server's async engine) drive ``step`` in a loop.

Tokenising happens on the front end's thread and detokenising on the engine's, so each has its own
tokenizer instance: a Hugging Face fast tokenizer is not safe to use from two threads at once.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llmserve.config import EngineConfig, resolve_dtype
from llmserve.engine.block_manager import BlockManager
from llmserve.engine.core import EngineCore
from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.messages import TokenLogprobs
from llmserve.engine.scheduler import Scheduler, stops_on_token
from llmserve.engine.sequence import Sequence
from llmserve.errors import InvalidRequestError
from llmserve.model_loader.loader import checkpoint_dtype, load_config, resolve_model_path
from llmserve.models.registry import resolve_model_class
from llmserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.tokenizer import load_tokenizer
from llmserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


class OutputKind(enum.Enum):
    """When ``step`` reports a request and what it holds: every step with everything so far (CUMULATIVE),
    every step with only what is new (DELTA, for streaming), or only once finished (FINAL_ONLY)."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class RequestState:
    """Engine-side bookkeeping of one user request and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_kind: OutputKind
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float
    logprobs: list[list[PositionLogprobs]] | None = None
    cumulative_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finished_time: float | None = None
    reported: list[int] = field(default_factory=list)   # DELTA: output tokens already reported, per sample
    prompt_logprobs_sent: bool = False
    error: str | None = None   # set when the model failed on this request (finish_reason "error")

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        if config.model is None:
            from llmserve.testing.checkpoints import demo_model_path

            config.model = str(demo_model_path())
        path = resolve_model_path(config.model, config.revision, config.download_dir)
        self.model_path = path
        self.hf_config = load_config(path, config.trust_remote_code, config.revision)
        resolve_model_class(self.hf_config)   # fail on an unsupported architecture before anything heavy
        self.dtype = resolve_dtype(config.dtype, checkpoint_dtype(self.hf_config), self.device)
        tokenizer_path = config.tokenizer or path
        if config.tokenizer:
            tokenizer_path = resolve_model_path(config.tokenizer, config.tokenizer_revision, config.download_dir)
        self.tokenizer = load_tokenizer(tokenizer_path, config.tokenizer_revision, config.trust_remote_code)
        # The engine thread's own instance, for detokenising (see the module docstring).
        self.output_tokenizer = load_tokenizer(tokenizer_path, config.tokenizer_revision, config.trust_remote_code)
        self.vocab_size = int(self.hf_config.vocab_size)
        self.eos_token_id = self._eos_token_id()
        self.extra_eos_token_ids = self._extra_eos_token_ids(path)
        self.max_model_len = self._max_model_len()
        self.max_num_batched_tokens = config.max_num_batched_tokens or (
            DEFAULT_MAX_NUM_BATCHED_TOKENS if config.enable_chunked_prefill
            else max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_model_len))
        if not config.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) is smaller than "
                             f"--max-model-len ({self.max_model_len}) with chunked prefill disabled: "
                             "long prompts could never be scheduled")
        self.core = EngineCore(config, self.max_model_len, self.max_num_batched_tokens)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

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

    # ------------------------------------------------------------------ start-up helpers
    def _eos_token_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.hf_config, "eos_token_id", None)
            if isinstance(eos, list):
                eos = eos[0] if eos else None
        return eos

    def _extra_eos_token_ids(self, path: Any) -> list[int]:
        """EOS ids of config.json / generation_config.json other than the tokenizer's (Qwen's <|endoftext|>,
        Llama 3's <|end_of_text|>); like vLLM, every request gets them as stop_token_ids unless ignore_eos."""
        sources = [getattr(self.hf_config, "eos_token_id", None)]
        generation_config = path / "generation_config.json"
        if generation_config.is_file():
            sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
        ids: list[int] = []
        for eos in sources:
            for token in (eos if isinstance(eos, list) else [eos]):
                if isinstance(token, int) and token != self.eos_token_id and token not in ids:
                    ids.append(token)
        return ids

    def _max_model_len(self) -> int:
        derived = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or None
        window = getattr(self.hf_config, "sliding_window", None)
        if window and getattr(self.hf_config, "use_sliding_window", True) and (derived is None or window < derived):
            logger.warning("Sliding-window attention is not implemented; capping the context at the "
                           "window (%d tokens), where full attention is exact", window)
            derived = int(window)
        requested = self.config.max_model_len
        if requested is None:
            if derived is None:
                raise ValueError("config.json has no max_position_embeddings: pass --max-model-len")
            return derived
        if derived is not None and requested > derived:
            raise ValueError(f"--max-model-len {requested} is larger than the model's maximum context "
                             f"length ({derived} tokens)")
        return requested

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, output_kind: OutputKind = OutputKind.CUMULATIVE,
                    cache_salt: str | None = None) -> None:
        """Validate and queue a request; raises :class:`InvalidRequestError` (and queues nothing) if it is bad."""
        self.enqueue(self.prepare_request(request_id, prompt, params, arrival_time, output_kind, cache_salt))

    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                        arrival_time: float | None = None,
                        output_kind: OutputKind = OutputKind.CUMULATIVE,
                        cache_salt: str | None = None) -> RequestState:
        """Tokenise and validate without touching the engine's state, so a front end can do it on its own
        thread; raises :class:`InvalidRequestError` naming the field. Requests with a ``cache_salt`` share
        prefix-cache blocks only with requests of the same salt (vLLM's field of that name)."""
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError("cache_salt must be a non-empty string", "cache_salt")
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        prompt_text, prompt_ids = self._tokenize(prompt)
        params.verify(self.vocab_size, self.config.max_logprobs)
        extra_eos = [t for t in self.extra_eos_token_ids if t not in params.stop_token_ids]
        if extra_eos and not params.ignore_eos:
            params = params.clone()   # the caller's object is not changed
            params.stop_token_ids = params.stop_token_ids + extra_eos
        max_tokens = self._resolve_max_tokens(len(prompt_ids), params.max_tokens)
        needed = self.block_manager.blocks_for(len(prompt_ids) + max_tokens)
        if needed > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"this request needs {needed} KV-cache blocks ({len(prompt_ids)} prompt + {max_tokens} completion "
                f"tokens) but the whole cache holds {self.block_manager.num_blocks}; lower max_tokens or give the "
                "cache more memory (--kv-cache-memory-bytes)", "max_tokens")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        salt = cache_salt.encode() if cache_salt else b""
        seqs = [Sequence(next(self._seq_ids), request_id, index, prompt_ids, params, max_tokens, self.eos_token_id,
                         arrival_time=arrival, extra_hash_keys=salt) for index in range(params.n)]
        state = RequestState(
            request_id, prompt_text, prompt_ids, params, output_kind, seqs,
            [IncrementalDetokenizer(self.output_tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
             for _ in seqs],
            arrival,
            logprobs=[[] for _ in seqs] if params.logprobs is not None else None,
            cumulative_logprobs=[0.0] * params.n,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            reported=[0] * params.n,
        )
        return state

    def enqueue(self, state: RequestState) -> None:
        """Queue a prepared request for scheduling."""
        if state.request_id in self.requests:
            raise InvalidRequestError(f"request id {state.request_id!r} is already in use", "request_id")
        self.requests[state.request_id] = state
        # n > 1: only the first sample prefills; the others fork from it when its prompt is done.
        state.seqs[0].pending_forks = state.seqs[1:]
        self.core.add(state.seqs[0])
        self.num_prompt_tokens_total += len(state.prompt_token_ids)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", "prompt")
            return prompt, list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt must be a string or a list of token ids (integers)", "prompt")
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})", "prompt")
        return None, list(prompt)

    def _resolve_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {prompt_len} "
                "tokens, which leaves no room for a completion. Please reduce the length of the prompt.", "prompt")
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or completion.", "max_tokens")
        return max_tokens

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        return self.abort(request_id) is not None

    def abort(self, request_id: str) -> RequestOutput | None:
        """Like :meth:`abort_request`, returning the request's final output (finish_reason ``"abort"``, with
        whatever it had not reported yet) so that stats can count it; None if unknown or already finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.core.finish(seq)
        state.finished_time = time.monotonic()
        return self._make_output(state, finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs for requests that progressed (per their output kind)."""
        result = self.core.step()
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        for request_id, message in result.failed.items():
            logger.error("model failed on request %s: %s", request_id, message)
            state = self.requests[request_id]
            state.error = message
            for seq in state.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "error"
                    self.core.finish(seq)
            touched[request_id] = state
        for seq, start, entries in result.prompt_logprobs:
            self._record_prompt_logprobs(self.requests[seq.request_id], start, entries)
        for seq, token, token_logprobs in result.sampled:
            state = self.requests[seq.request_id]
            self._process_token(state, seq, token, token_logprobs)
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            finished = state.finished
            if finished:
                state.finished_time = now
                del self.requests[state.request_id]
            if finished or state.output_kind is not OutputKind.FINAL_ONLY:
                outputs.append(self._make_output(state, finished))
        return outputs

    def _process_token(self, state: RequestState, seq: Sequence, token: int,
                       token_logprobs: TokenLogprobs | None) -> None:
        """Logprobs, detokenisation and stop strings for a token the core appended (and maybe finished on)."""
        self.num_generation_tokens_total += 1
        if token_logprobs is not None:
            state.cumulative_logprobs[seq.index] += token_logprobs.logprob
            if state.logprobs is not None:
                state.logprobs[seq.index].append(self._position_logprobs(token_logprobs))
        detokenizer = state.detokenizers[seq.index]
        if stops_on_token(seq, token) and not seq.params.include_stop_str_in_output:
            stop_string = None   # the text of the EOS / stop token is not part of the output (vLLM)
        else:
            # vLLM: stop strings count only once more than min_tokens tokens exist.
            stop_string = detokenizer.update([token], check_stop=len(seq.output_token_ids) > seq.params.min_tokens)
        if stop_string is not None and not stops_on_token(seq, token):
            seq.finish_reason, seq.stop_reason = "stop", stop_string   # before "length" (vLLM's order)
            self.core.finish(seq)
        if seq.finish_reason:
            detokenizer.get_next_output_text(finished=True, delta=False)   # flush a cut-off character

    def _record_prompt_logprobs(self, state: RequestState, start: int, entries: list[TokenLogprobs]) -> None:
        """Store prompt logprobs once; a recomputed (preempted) or parallel sequence reports them again.

        ``entries[i]`` is the logprob of prompt token ``start + i + 1``; slot 0 (the first token) is None.
        """
        assert state.prompt_logprobs is not None
        for offset, entry in enumerate(entries):
            if start + offset + 1 == len(state.prompt_logprobs):
                state.prompt_logprobs.append(self._position_logprobs(entry))

    def _position_logprobs(self, entry: TokenLogprobs) -> PositionLogprobs:
        decode = self.output_tokenizer.convert_ids_to_tokens
        result = {entry.token_id: Logprob(entry.logprob, entry.rank, decode(entry.token_id))}
        for rank, (token, lp) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1):
            result.setdefault(token, Logprob(lp, rank, decode(token)))
        return result

    def _make_output(self, state: RequestState, finished: bool) -> RequestOutput:
        delta = state.output_kind is OutputKind.DELTA
        completions = []
        for seq, detok in zip(state.seqs, state.detokenizers):
            start = state.reported[seq.index] if delta else 0
            logprobs = state.logprobs[seq.index][start:] if state.logprobs is not None else None
            if delta:
                text = detok.get_next_output_text(finished=seq.finish_reason is not None, delta=True)
                state.reported[seq.index] = len(seq.output_token_ids)
            else:
                text = detok.output_text
            completions.append(CompletionOutput(
                index=seq.index,
                text=text,
                token_ids=seq.output_token_ids[start:],
                cumulative_logprob=state.cumulative_logprobs[seq.index] if state.logprobs is not None else None,
                logprobs=logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        prompt_logprobs = state.prompt_logprobs
        if delta and prompt_logprobs is not None:
            # Streamed once, with the first output after the whole prompt has been computed.
            complete = len(prompt_logprobs) == len(state.prompt_token_ids) and not state.prompt_logprobs_sent
            state.prompt_logprobs_sent |= complete
            prompt_logprobs = prompt_logprobs if complete else None
        metrics = RequestMetrics(
            arrival_time=state.arrival_time,
            first_scheduled_time=min((s.first_scheduled_time for s in state.seqs if s.first_scheduled_time),
                                     default=None),
            first_token_time=min((s.first_token_time for s in state.seqs if s.first_token_time), default=None),
            last_token_time=max((s.last_token_time for s in state.seqs if s.last_token_time), default=None),
            finished_time=state.finished_time,
        )
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, prompt_logprobs,
                             completions, finished, metrics, sum(s.num_preemptions for s in state.seqs),
                             num_generated_tokens=max(len(s.output_token_ids) for s in state.seqs),
                             error=state.error)

    # ------------------------------------------------------------------ stats
    @property
    def num_running_requests(self) -> int:
        """Requests with a sequence in the running batch (vLLM counts requests, not samples)."""
        return len({seq.request_id for seq in self.scheduler.running.values()})

    @property
    def num_waiting_requests(self) -> int:
        return len(self.requests) - self.num_running_requests

    def kv_cache_waste(self) -> float:
        """Slots allocated to running sequences but not holding computed tokens, over slots allocated."""
        allocated, filled = self.block_manager.waste(list(self.scheduler.running.values()))
        return (allocated - filled) / allocated if allocated else 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "num_requests_running": self.num_running_requests,
            "num_requests_waiting": self.num_waiting_requests,
            "kv_cache_usage": self.block_manager.usage,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": self.block_manager.prefix_query_tokens,
            "prefix_cache_hits": self.block_manager.prefix_hit_tokens,
            "kv_cache_waste": self.kv_cache_waste(),
            "prompt_tokens": self.num_prompt_tokens_total,
            "generation_tokens": self.num_generation_tokens_total,
        }
