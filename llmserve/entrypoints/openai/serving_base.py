"""What /v1/completions, /v1/chat/completions and /v1/embeddings share: admission (model name, queue limit,
validation of every prompt before any runs), running the engine streams under a timeout and a disconnect
watch, SSE framing, logprob rendering and the per-request log line."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import Request
from starlette.types import Receive

from llmserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, ShutdownError
from llmserve.engine.output_processor import AnyRequestOutput, RequestState
from llmserve.engine.output_stream import OutputStream
from llmserve.entrypoints.openai.errors import APIError, error_body
from llmserve.entrypoints.openai.serving_models import OpenAIServingModels
from llmserve.lora.request import LoRARequest
from llmserve.outputs import CompletionOutput, EmbeddingRequestOutput, PositionLogprobs, RequestOutput
from llmserve.pooling_params import PoolingParams
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger("llmserve.api")


@dataclass
class ServerLimits:
    max_num_queued_reqs: int | None = None
    request_timeout: float | None = None
    max_n: int = 128


@dataclass
class Submitted:
    """One HTTP request's engine requests (one per prompt), already queued."""

    request_id: str
    log_id: str            # names it in the log: the X-Request-Id it was sent or given
    created: int
    states: list[RequestState]
    streams: list[OutputStream]
    model: str             # the name responses echo: the adapter's, or the base model's first served name


# One event per streamed token: msgspec writes the chunk's UTF-8 JSON straight to bytes, several times faster
# than json.dumps plus str.encode (a NaN or infinite float is written as null, as pydantic writes it).
encode_json = msgspec.json.Encoder().encode


def sse(data: dict | str) -> bytes:
    return b"data: " + (data.encode() if isinstance(data, str) else encode_json(data)) + b"\n\n"


class SSEFraming:
    """How an endpoint frames its server-sent events. Completions and chat send bare ``data:`` events, an
    error as OpenAI's error object, and close with ``data: [DONE]``; the Responses API frames differently
    (:class:`llmserve.entrypoints.openai.serving_responses.ResponsesFraming`)."""

    def event(self, data: dict) -> bytes:
        return sse(data)

    def error(self, status: int, message: str, code: str | None) -> bytes:
        return sse(error_body(status, message, None, code))

    def closing(self) -> list[bytes]:
        return [sse("[DONE]")]


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, models: OpenAIServingModels, limits: ServerLimits) -> None:
        self.engine = engine
        self.models = models
        self.limits = limits
        self.tokenizer = engine.info.tokenizer
        self.token_text = TokenTexts(self.tokenizer)

    @property
    def served_model_names(self) -> list[str]:
        return self.models.base_model_names

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter ``model`` names (None: the base model); 404 for a name that is neither."""
        return self.models.resolve(model)

    def check_n(self, n: int) -> None:
        if n > self.limits.max_n:
            raise APIError(400, f"n must be at most {self.limits.max_n}, got {n}", "n")

    def with_special_tokens(self, prompts: list[str | list[int]], add: bool, field: str) -> list[str | list[int]]:
        """``prompts`` as the engine takes them: text prompts are tokenised there with the tokenizer's special
        tokens (BOS); with ``add`` false they are tokenised here without them (token ids pass as they are)."""
        if add:
            return prompts
        out: list[str | list[int]] = []
        for prompt in prompts:
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False)) if isinstance(prompt, str) else prompt
            if not ids:
                raise APIError(400, f"{field} has no tokens once tokenised without special tokens", field)
            out.append(ids)
        return out

    def submit(self, prefix: str, prompts: list[str | list[int]], params: SamplingParams | PoolingParams,
               header_request_id: str | None, cache_salt: str | None = None,
               lora_request: LoRARequest | None = None, client_request_id: str | None = None) -> Submitted:
        """Validate every prompt, check the queue, then queue them all (or none), with ``lora_request``'s
        adapter if one is named. ``client_request_id`` (vLLM's ``request_id`` field) names the response
        (``prefix-id``); the engine's own ids stay unique whatever a client sends."""
        limit = self.limits.max_num_queued_reqs
        if limit is not None and self.engine.num_waiting >= limit:   # full (a batch of prompts may overfill it)
            raise APIError(503, f"the server is overloaded: {self.engine.num_waiting} requests are waiting "
                           f"(--max-num-queued-reqs {limit}); retry later", None, "overloaded",
                           headers={"Retry-After": "1"})
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        arrival = time.monotonic()
        try:
            states = [self.engine.prepare(f"{request_id}-{i}", prompt, params, arrival, cache_salt, lora_request)
                      for i, prompt in enumerate(prompts)]
        except EngineDeadError as exc:
            raise APIError(503, str(exc), None, "engine_dead") from None
        streams = [self.engine.submit(state) for state in states]
        if client_request_id is not None:
            request_id = f"{prefix}-{client_request_id}"
        return Submitted(request_id, header_request_id or request_id, int(time.time()), states, streams,
                         self.model_name if lora_request is None else lora_request.lora_name)

    async def collect(self, raw: Request, submitted: Submitted) -> list[AnyRequestOutput]:
        """Run every stream to completion (non-streaming response); if the client leaves or the request
        times out, every unfinished request is aborted. Returns each prompt's final output."""

        async def run(stream: OutputStream) -> AnyRequestOutput:
            merger = DeltaMerger()
            async for output in stream:
                merger.add(output)
            return merger.merged()

        tasks = [asyncio.ensure_future(run(s)) for s in submitted.streams]
        everything = asyncio.gather(*tasks)
        watcher = asyncio.ensure_future(wait_disconnect(raw.receive))
        try:
            done, _ = await asyncio.wait([everything, watcher], timeout=self.limits.request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if everything not in done:
                if watcher in done:
                    log_failed(submitted.log_id, "aborted: the client disconnected")
                    raise APIError(499, "client disconnected", None, "client_closed")   # nobody reads it
                log_failed(submitted.log_id, f"aborted: no result within --request-timeout "
                                             f"({self.limits.request_timeout} s)")
                raise APIError(504, f"the request did not finish within --request-timeout "
                               f"({self.limits.request_timeout} s)", None, "timeout")
            merged = everything.result()
        except (EngineDeadError, ShutdownError) as exc:
            log_failed(submitted.log_id, f"failed: {exc}")
            raise APIError(503, str(exc), None, unavailable_code(exc), headers={"Retry-After": "5"}) from None
        finally:
            watcher.cancel()
            self.abort_unfinished(submitted)
            everything.cancel()
            # an aborted stream's task ends in CancelledError, which the gather keeps (and asyncio logs, with a
            # traceback, when nobody reads it): read it
            everything.add_done_callback(lambda f: f.cancelled() or f.exception())
        for output in merged:
            if output.error is not None:
                log_failed(submitted.log_id, f"failed: {output.error}")
                raise APIError(500, f"the engine failed on this request: {output.error}", None, "engine_error")
        for output in merged:
            log_finished(submitted.log_id, output)
        return merged

    def abort_unfinished(self, submitted: Submitted) -> None:
        """Abort every request of ``submitted`` that has not finished, now: cancelling the tasks that read their
        streams would also abort them, but only once the event loop has run each of them again."""
        for state in submitted.states:
            self.engine.abort(state.request_id)


def unavailable_code(exc: BaseException) -> str:
    return "shutting_down" if isinstance(exc, ShutdownError) else "engine_dead"


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client hangs up. The body has been read, so the server's next ASGI message is the
    disconnect (as for Starlette's streaming responses); polling ``Request.is_disconnected`` instead costs a
    cancelled receive every few tens of milliseconds for every request in flight."""
    while (await receive())["type"] != "http.disconnect":
        pass


class DeltaMerger:
    """A request's streamed (delta) outputs folded, as they arrive, into one final output (a pooling request
    has only one). What is kept is each sample's texts, token ids and logprobs and its latest completion, not
    every output: a stream that kept them all alive until it ended would leave several objects per token
    for each of the garbage collector's passes to walk again. Samples are keyed by their index: with ``n`` > 1
    a sample that finished early is in no later output."""

    def __init__(self) -> None:
        self.last: AnyRequestOutput | None = None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.latest: dict[int, CompletionOutput] = {}
        self.texts: dict[int, list[str]] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[PositionLogprobs]] = {}

    def add(self, output: AnyRequestOutput) -> None:
        self.last = output
        if isinstance(output, EmbeddingRequestOutput):
            return
        if self.prompt_logprobs is None:
            self.prompt_logprobs = output.prompt_logprobs
        for completion in output.outputs:
            i = completion.index
            if i not in self.latest:
                self.texts[i], self.token_ids[i], self.logprobs[i] = [], [], []
            self.latest[i] = completion
            self.texts[i].append(completion.text)
            self.token_ids[i].extend(completion.token_ids)
            if completion.logprobs:
                self.logprobs[i].extend(completion.logprobs)

    def merged(self) -> AnyRequestOutput:
        last = self.last
        assert last is not None, "no output to merge"
        if isinstance(last, EmbeddingRequestOutput):
            return last
        merged = [type(completion)(
            index=i, text="".join(self.texts[i]), token_ids=self.token_ids[i],
            cumulative_logprob=completion.cumulative_logprob,
            logprobs=None if completion.logprobs is None else self.logprobs[i],
            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
            for i, completion in sorted(self.latest.items())]
        return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, self.prompt_logprobs, merged,
                             last.finished, last.metrics, last.num_preemptions, last.num_generated_tokens, last.error,
                             last.num_cached_tokens)


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    """OpenAI's ``usage``, with ``prompt_tokens_details.cached_tokens``: the prompt tokens the prefix cache served."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


def log_finished(log_id: str, output: AnyRequestOutput) -> None:
    m = output.metrics
    ttft = m.time_to_first_token
    total = (m.finished_time or time.monotonic()) - m.arrival_time
    completions = [] if isinstance(output, EmbeddingRequestOutput) else output.outputs
    logger.info("request %s finished: prompt_tokens=%d output_tokens=%d ttft=%s total=%.3fs finish=%s",
                log_id, len(output.prompt_token_ids), sum(len(c.token_ids) for c in completions),
                f"{ttft:.3f}s" if ttft is not None else "-", total,
                ",".join(str(c.finish_reason) for c in completions) or output.finish_reason,
                extra={"request_id": log_id})


def log_failed(log_id: str, what: str) -> None:
    logger.info("request %s %s", log_id, what, extra={"request_id": log_id})


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (the printable Latin-1 bytes as
    themselves, the others from U+0100 on, in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


class TokenTexts:
    """The text each token id adds to a sequence, as logprobs show it (a sentencepiece "▁the" is " the",
    which decoding the id alone would strip), and its raw bytes (:meth:`raw_bytes`). Cached: a vocabulary is
    finite."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self.anchor_text = tokenizer.decode(self.anchor)
        self.cache: dict[int, str] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        # byte-level BPE (GPT-2, Llama 3, Qwen): each character of a token stands for one byte
        self.byte_of_char = ({c: b for b, c in bytes_to_unicode().items()}
                             if type(decoder).__name__ == "ByteLevel" else None)
        self.bytes_cache: dict[int, list[int]] = {}

    def raw_bytes(self, token_id: int) -> list[int]:
        """The bytes the token stands for (OpenAI's ``bytes``), also where they are not whole UTF-8 characters:
        a sentencepiece byte-fallback token ``<0xE6>`` is ``[230]``, not the replacement character's bytes."""
        found = self.bytes_cache.get(token_id)
        if found is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            fallback = _BYTE_TOKEN.fullmatch(piece or "")
            if fallback:
                found = [int(fallback[1], 16)]
            elif self.byte_of_char is not None and piece and all(c in self.byte_of_char for c in piece):
                found = [self.byte_of_char[c] for c in piece]
            else:
                found = list(self(token_id).encode("utf-8"))
            self.bytes_cache[token_id] = found
        return found

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            if token_id in self.tokenizer.all_special_ids:
                text = self.tokenizer.decode([token_id])
            else:
                text = self.tokenizer.decode(self.anchor + [token_id])[len(self.anchor_text):]
            self.cache[token_id] = text
        return text
