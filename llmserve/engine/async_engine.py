"""The API server's engine: input and output processing on the event loop, the engine core in its own process.

A request is tokenised and validated in the event loop (:class:`InputProcessor`), sent to the engine-core
process (:class:`EngineCoreClient`), and every step's token ids come back as one message that the event
loop turns into per-request deltas (:class:`OutputProcessor`: detokenising, stop strings) and hands to the
requests' streams (:class:`OutputStream`). The model never runs in this process, so a slow client or a burst
of SSE work never stalls a step, and the step loop never waits for this process's GIL. A disconnect becomes an abort that
the core applies before its next step. If the core process dies, every stream gets
:class:`EngineDeadError` and ``on_dead`` is called (the server turns /health to 503 and exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine.core_client import EngineCoreClient, EngineCoreDiedError
from llmserve.engine.input_processor import InputProcessor, ModelInfo
from llmserve.engine.llm_engine import stats_dict
from llmserve.engine.messages import BlockMap, SchedulerStats
from llmserve.engine.output_processor import AnyRequestOutput, OutputKind, OutputProcessor, RequestState
from llmserve.engine.output_stream import OutputStream
from llmserve.errors import InvalidRequestError
from llmserve.model_loader.loader import resolve_model_path
from llmserve.model_loader.model_source import fill_in_default_model
from llmserve.lora.request import LoRARequest
from llmserve.pooling_params import PoolingParams
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any], list[AnyRequestOutput]], None]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served any more."""


class ShutdownError(RuntimeError):
    """The server is shutting down and the request ran out of the time it was given to finish."""


def start_engine_core(config: EngineConfig) -> EngineCoreClient:
    """Fetch the model once (no ``--model``: the demo checkpoint, generated on first use; a Hub id or an S3
    prefix: downloaded here, so the core finds it cached), then start the core process on it."""
    fill_in_default_model(config)
    return EngineCoreClient(config, resolve_model_path(config.model, config.revision, config.download_dir))


def _build_grammar_validator(inputs: InputProcessor) -> None:
    """Build the front end's grammar checker ahead of the first constrained request (reading the vocabulary
    takes a noticeable fraction of a second, which on the event loop would stall every stream)."""
    try:
        inputs.grammar_validator(inputs.info.load_tokenizer())   # its own tokenizer: the loop encodes with the other
    except ImportError:
        pass   # the grammar library is an optional extra; a constrained request says how to install it
    except Exception:   # noqa: BLE001 - the first constrained request raises it again, as its own error
        logger.debug("building the grammar validator failed", exc_info=True)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, on_step: StepCallback | None = None,
                 on_dead: Callable[[BaseException], None] | None = None,
                 client: EngineCoreClient | None = None) -> None:
        """Start the engine-core process (unless ``client`` is one already started on ``config``), which loads
        the model while this process loads the model's config and tokenizer (blocking: call it off the event
        loop); ``start`` waits for the core and attaches to the loop."""
        self.client = client or start_engine_core(config)
        try:
            self.info = ModelInfo(config, self.client.model_path)   # while the core process starts
        except BaseException:
            self.client.shutdown(timeout=0.0)
            raise
        self.outputs = OutputProcessor(self.info.load_tokenizer(), config.stream_interval)
        self.on_step = on_step
        self.on_dead = on_dead
        self._streams: dict[str, OutputStream] = {}
        self._stats = SchedulerStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._block_map_waiters: list[asyncio.Future[BlockMap]] = []
        self.dead_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the core is ready (blocking: call it off the event loop), then read its outputs on
        ``loop``; requests are taken from then on."""
        num_blocks = self.client.wait_until_ready()
        self.inputs = InputProcessor(self.info, num_blocks, self.info.config.block_size,
                                     self.client.group_windows)
        if self.info.eos_token_ids:   # structured outputs need one; built here, the first request would wait on the loop
            threading.Thread(target=_build_grammar_validator, args=(self.inputs,), name="llmserve-grammar-validator",
                             daemon=True).start()
        self._stats = SchedulerStats(num_blocks=num_blocks, num_free_blocks=num_blocks)
        self._loop = loop
        loop.call_soon_threadsafe(loop.add_reader, self.client.fileno(), self._on_core_output)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.client.fileno())
            except (RuntimeError, ValueError, OSError):
                pass
        self.client.shutdown(timeout)

    @property
    def is_running(self) -> bool:
        return self.dead_error is None and self.client.process.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running."""
        return max(0, len(self.outputs.requests) - self._stats.num_requests_running)

    def stats(self) -> dict[str, Any]:
        return stats_dict(self._stats, self.outputs)

    async def block_map(self, max_cells: int, timeout: float = 1.0) -> BlockMap | None:
        """The KV cache's block map, asked of the core, which answers between two steps; None if no answer
        came within ``timeout`` seconds (a long step) or the engine is not running."""
        if not self.is_running:
            return None
        waiter: asyncio.Future[BlockMap] = asyncio.get_running_loop().create_future()
        self._block_map_waiters.append(waiter)
        self.client.request_block_map(max_cells)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            if waiter in self._block_map_waiters:
                self._block_map_waiters.remove(waiter)

    # ------------------------------------------------------------------ requests (event loop)
    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams | PoolingParams,
                arrival_time: float | None = None, cache_salt: str | None = None,
                lora_request: LoRARequest | None = None) -> RequestState:
        """Tokenise and validate (raises :class:`~llmserve.errors.InvalidRequestError`); queues nothing, so
        a request with several prompts can be checked whole before any of it runs."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self.outputs.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        prompt_text, request = self.inputs.process(request_id, prompt, params, arrival_time, cache_salt,
                                                   lora_request)
        return self.outputs.make_state(prompt_text, request, OutputKind.DELTA)

    def submit(self, state: RequestState) -> OutputStream:
        """Queue a prepared request now; its outputs (each holds only what is new) come on the stream returned.

        A reader that stops before the request finishes (client gone, timeout) calls :meth:`abort`.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if state.request_id in self.outputs.requests:
            raise InvalidRequestError(f"request id {state.request_id!r} is already in use", "request_id")
        stream = OutputStream()
        self.outputs.add(state)
        self._streams[state.request_id] = stream
        self.client.add_request(state.core_request)
        return stream

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        output = self.outputs.abort(request_id)
        if output is not None:
            self.client.abort(request_id)
            if self.on_step is not None:
                self.on_step(self.stats(), [output])   # counted, though nobody is left to deliver it to

    def abort_all(self, error: BaseException) -> None:
        """Abort every request queued or running (server shutdown); their streams raise ``error``."""
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            self.abort(request_id)

    # ------------------------------------------------------------------ outputs (event loop)
    def _on_core_output(self) -> None:
        """Hand the core's new messages to the streams: one output per stream, however many steps were waiting
        (a front end that fell behind catches up with one wake-up and one SSE event per stream)."""
        try:
            messages = self.client.receive_all()
        except EngineCoreDiedError as exc:
            self._died(exc)
            return
        for core_outputs in messages:
            if core_outputs.stats is not None:
                self._stats = core_outputs.stats
            if core_outputs.block_map is not None:
                for waiter in self._block_map_waiters:
                    if not waiter.done():
                        waiter.set_result(core_outputs.block_map)
                self._block_map_waiters.clear()
            for request_id, message in core_outputs.failed.items():
                logger.error("model failed on request %s: %s", request_id, message)
        outputs, stopped = self.outputs.process(*messages)
        for request_id, index in stopped:
            self.client.abort(request_id, index)
        if self.on_step is not None:   # metrics first, so they include what clients receive next
            stats = stats_dict(self._stats, self.outputs, [m.num_scheduled_tokens for m in messages],
                               [abort for m in messages for abort in m.aborts])
            self.on_step(stats, outputs)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            try:
                stream.put(output)
            except Exception:   # a reader's callback failed: its request ends, the others go on
                logger.exception("delivering an output of request %s failed", output.request_id)
                self.abort(output.request_id)
        # acknowledged after the tasks woken above have run (call_soon keeps order): the core's lead is
        # measured against what the streams took, not against what sits in their queues
        self._loop.call_soon(self.client.ack, len(messages))

    def _died(self, exc: BaseException) -> None:
        logger.error("engine core died: %s", exc)
        self.dead_error = exc
        if self._loop is not None:
            self._loop.remove_reader(self.client.fileno())
        dead = EngineDeadError(f"the engine loop died: {exc}")
        for stream in self._streams.values():
            stream.put(dead)
        self._streams.clear()
        self.client.shutdown(timeout=1.0)
        if self.on_dead is not None:
            self.on_dead(exc)
