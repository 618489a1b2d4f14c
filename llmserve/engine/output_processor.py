"""The front end's half of a step: the engine core's token ids become request outputs.

Per request it keeps what the client will see: each sample's tokens, logprobs and incremental
detokeniser, the prompt logprobs, and how much has been reported. Stop strings are found here, in text;
a sample that hits one is finished at once and reported back so the core can free it (as vLLM V1's
output processor does). A pooling request has nothing to detokenise: it is reported once, finished, with
its vector (:class:`~llmserve.outputs.EmbeddingRequestOutput`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.messages import EngineCoreOutputs, EngineCoreRequest, SampleOutput, TokenLogprobs
from llmserve.layers.pooler import as_floats
from llmserve.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from llmserve.sampling_params import SamplingParams

# What a step reports for a request: a completion's output, or a pooling request's vector.
AnyRequestOutput = RequestOutput | EmbeddingRequestOutput


class OutputKind(enum.Enum):
    """When ``step`` reports a request and what it holds: every step with everything so far (CUMULATIVE),
    every step with only what is new (DELTA, for streaming), or only once finished (FINAL_ONLY)."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class SampleState:
    """One of a request's ``n`` samples, as the front end sees it."""

    index: int
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestState:
    """Front-end bookkeeping of one user request: its core request and what has been produced and reported."""

    request_id: str
    prompt: str | None
    core_request: EngineCoreRequest
    output_kind: OutputKind
    samples: list[SampleState]
    detokenizers: list[IncrementalDetokenizer]
    logprobs: list[list[PositionLogprobs]] | None = None
    cumulative_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finished_time: float | None = None
    reported: list[int] = field(default_factory=list)   # output tokens already reported, per sample
    finish_reported: list[bool] = field(default_factory=list)   # per sample, in DELTA mode: its finish went out
    prompt_logprobs_sent: bool = False
    error: str | None = None   # set when the model failed on this request (finish_reason "error")
    embedding: bytes = b""     # a pooling request's vector (float32 little-endian), once computed

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.core_request.prompt_token_ids

    @property
    def params(self) -> SamplingParams:
        return self.core_request.params

    @property
    def arrival_time(self) -> float:
        return self.core_request.arrival_time

    @property
    def finished(self) -> bool:
        for sample in self.samples:   # a loop, not all(genexpr): it runs for every request on every step
            if sample.finish_reason is None:
                return False
        return True

    @property
    def is_pooling(self) -> bool:
        return self.core_request.pooling is not None


class OutputProcessor:
    def __init__(self, tokenizer: Any, stream_interval: int = 1) -> None:
        self.tokenizer = tokenizer   # this thread's own instance
        # A request that is not FINAL_ONLY is reported once it has this many new tokens (or its first, or when
        # it finishes), as vLLM's --stream-interval: fewer outputs, so less per-token work for a server.
        self.stream_interval = stream_interval
        self.requests: dict[str, RequestState] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def make_state(self, prompt: str | None, request: EngineCoreRequest, output_kind: OutputKind) -> RequestState:
        params, n = request.params, request.params.n
        detokenizers = [] if request.pooling is not None else [   # a pooling request has no text
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                   skip_special_tokens=params.skip_special_tokens,
                                   spaces_between_special_tokens=params.spaces_between_special_tokens,
                                   stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            for _ in range(n)]
        return RequestState(
            request.request_id, prompt, request, output_kind, [SampleState(i) for i in range(n)], detokenizers,
            logprobs=[[] for _ in range(n)] if params.logprobs is not None else None,
            cumulative_logprobs=[0.0] * n,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            reported=[0] * n, finish_reported=[False] * n)

    def add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        self.num_prompt_tokens_total += len(state.prompt_token_ids)

    def abort(self, request_id: str) -> AnyRequestOutput | None:
        """Finish a request with ``"abort"``; its final output (with whatever was not reported yet), or None
        if it is unknown or already finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for sample in state.samples:
            if not sample.is_finished:
                sample.finish_reason = "abort"
        state.finished_time = time.monotonic()
        return self._make_output(state, finished=True)

    def process(self, *messages: EngineCoreOutputs) -> tuple[list[AnyRequestOutput], list[tuple[str, int]]]:
        """The outputs of one or more of the core's messages, in order (per each request's output kind): one
        output per request that progressed, however many of the messages touched it, so a front end that
        fell behind by a step hands each stream both steps' tokens at once. Also the samples that a stop
        string finished, which the core must stop."""
        touched: dict[str, RequestState] = {}
        stopped: list[tuple[str, int]] = []
        for core in messages:
            self._apply(core, touched, stopped)
        now = time.monotonic()
        outputs = []
        for state in touched.values():
            finished = state.finished
            if finished:
                state.finished_time = now
                del self.requests[state.request_id]
            if finished or (state.output_kind is not OutputKind.FINAL_ONLY and self._due(state)):
                outputs.append(self._make_output(state, finished))
        return outputs, stopped

    def _due(self, state: RequestState) -> bool:
        """Whether an unfinished request is reported now: nothing reported yet (its first token goes out at
        once), a sample with ``stream_interval`` tokens not yet reported, or a sample that just finished (with
        ``n`` > 1 the others may go on)."""
        interval = self.stream_interval
        return interval == 1 or any(
            reported == 0 or len(sample.output_token_ids) - reported >= interval
            or (sample.is_finished and len(sample.output_token_ids) > reported)
            for sample, reported in zip(state.samples, state.reported))

    def _apply(self, core: EngineCoreOutputs, touched: dict[str, RequestState], stopped: list[tuple[str, int]]
               ) -> None:
        """Record one message's failures, vectors, prompt logprobs and tokens; note the requests it touched."""
        for request_id, message in core.failed.items():
            state = self.requests.get(request_id)
            if state is None:
                continue
            state.error = message
            for sample in state.samples:
                if not sample.is_finished:
                    sample.finish_reason = "error"
            touched[request_id] = state
        for request_id, vector in core.pooled.items():
            state = self.requests.get(request_id)
            if state is not None:
                state.embedding = vector
                state.samples[0].finish_reason = "stop"
                touched[request_id] = state
        for request_id, start, entries in core.prompt_logprobs:
            state = self.requests.get(request_id)
            if state is not None:
                self._record_prompt_logprobs(state, start, entries)
        for out in core.samples:
            state = self.requests.get(out.request_id)
            if state is None or state.samples[out.index].is_finished:
                continue   # aborted, or finished here on a stop string while the core ran on
            if self._process_sample(state, out):
                stopped.append((out.request_id, out.index))
            touched[out.request_id] = state

    def _process_sample(self, state: RequestState, out: SampleOutput) -> bool:
        """Apply new tokens; True if a stop string finished a sample the core has not finished."""
        sample = state.samples[out.index]
        params = state.params
        sample.first_scheduled_time = out.first_scheduled_time
        sample.first_token_time = sample.first_token_time or out.first_token_time
        sample.last_token_time = out.last_token_time
        sample.num_preemptions = out.num_preemptions
        sample.num_cached_tokens = out.num_cached_tokens
        detokenizer = state.detokenizers[out.index]
        for i, token in enumerate(out.new_token_ids):
            sample.output_token_ids.append(token)
            self.num_generation_tokens_total += 1
            if i < len(out.logprobs):
                entry = out.logprobs[i]
                state.cumulative_logprobs[out.index] += entry.logprob
                if state.logprobs is not None:
                    state.logprobs[out.index].append(self._position_logprobs(entry))
            last = i == len(out.new_token_ids) - 1
            stopped_on_token = last and out.finish_reason == "stop"   # the core stops on EOS / stop ids only
            if stopped_on_token and not params.include_stop_str_in_output:
                stop_string = None   # the text of the EOS / stop token is not part of the output (vLLM)
            else:
                # vLLM: stop strings count only once more than min_tokens tokens exist.
                stop_string = detokenizer.update([token],
                                                 check_stop=len(sample.output_token_ids) > params.min_tokens)
            if stop_string is not None and not stopped_on_token:
                sample.finish_reason, sample.stop_reason = "stop", stop_string   # before "length" (vLLM's order)
                detokenizer.get_next_output_text(finished=True, delta=False)
                return out.finish_reason is None   # else the core has finished it too
        if out.finish_reason is not None:
            sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
            detokenizer.get_next_output_text(finished=True, delta=False)   # flush a cut-off character
        return False

    def _record_prompt_logprobs(self, state: RequestState, start: int, entries: list[TokenLogprobs]) -> None:
        """Store prompt logprobs once; a recomputed (preempted) sequence reports them again.

        ``entries[i]`` is the logprob of prompt token ``start + i + 1``; slot 0 (the first token) is None.
        """
        assert state.prompt_logprobs is not None
        for offset, entry in enumerate(entries):
            if start + offset + 1 == len(state.prompt_logprobs):
                state.prompt_logprobs.append(self._position_logprobs(entry))

    def _position_logprobs(self, entry: TokenLogprobs) -> PositionLogprobs:
        decode = self.tokenizer.convert_ids_to_tokens
        result = {entry.token_id: Logprob(entry.logprob, entry.rank, decode(entry.token_id))}
        for rank, (token, lp) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1):
            result.setdefault(token, Logprob(lp, rank, decode(token)))
        return result

    def _make_output(self, state: RequestState, finished: bool) -> AnyRequestOutput:
        if state.is_pooling:
            return EmbeddingRequestOutput(
                state.request_id, state.prompt, state.prompt_token_ids, EmbeddingOutput(as_floats(state.embedding)),
                finished, state.samples[0].finish_reason,
                RequestMetrics(state.arrival_time, finished_time=state.finished_time), error=state.error)
        delta = state.output_kind is OutputKind.DELTA
        completions = []
        for sample, detok in zip(state.samples, state.detokenizers):
            if delta and state.finish_reported[sample.index]:
                continue   # a finished sample (n > 1, the others going on) is reported once, with its finish
            start = state.reported[sample.index] if delta else 0
            logprobs = state.logprobs[sample.index][start:] if state.logprobs is not None else None
            if delta:
                text = detok.get_next_output_text(finished=sample.is_finished, delta=True)
            else:
                text = detok.output_text
            state.reported[sample.index] = len(sample.output_token_ids)
            state.finish_reported[sample.index] = sample.finish_reason is not None
            completions.append(CompletionOutput(
                index=sample.index,
                text=text,
                token_ids=sample.output_token_ids[start:],
                cumulative_logprob=state.cumulative_logprobs[sample.index] if state.logprobs is not None else None,
                logprobs=logprobs,
                finish_reason=sample.finish_reason,
                stop_reason=sample.stop_reason,
            ))
        prompt_logprobs = state.prompt_logprobs
        if delta and prompt_logprobs is not None:
            # Streamed once, with the first output after the whole prompt has been computed.
            complete = len(prompt_logprobs) == len(state.prompt_token_ids) and not state.prompt_logprobs_sent
            state.prompt_logprobs_sent |= complete
            prompt_logprobs = prompt_logprobs if complete else None
        first_scheduled = first_token = last_token = None
        num_preemptions = num_generated = num_cached = 0
        for s in state.samples:   # one pass, no generator expressions: this runs for every streamed token
            if s.first_scheduled_time and (first_scheduled is None or s.first_scheduled_time < first_scheduled):
                first_scheduled = s.first_scheduled_time
            if s.first_token_time and (first_token is None or s.first_token_time < first_token):
                first_token = s.first_token_time
            if s.last_token_time and (last_token is None or s.last_token_time > last_token):
                last_token = s.last_token_time
            num_preemptions += s.num_preemptions
            num_generated = max(num_generated, len(s.output_token_ids))
            num_cached = max(num_cached, s.num_cached_tokens)   # the samples share the prompt
        metrics = RequestMetrics(state.arrival_time, first_scheduled, first_token, last_token, state.finished_time)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, prompt_logprobs,
                             completions, finished, metrics, num_preemptions, num_generated_tokens=num_generated,
                             error=state.error, num_cached_tokens=num_cached)
