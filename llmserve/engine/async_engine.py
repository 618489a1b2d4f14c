"""Runs the engine's step loop in a background thread and streams each request's outputs to asyncio.

The HTTP server never runs the model: it validates and tokenises a request in the event loop, hands it
to the engine thread through a command queue and reads the request's outputs from an asyncio queue.
A slow client never stalls a step; a disconnect becomes an abort that the loop applies before its next
step, so the request's blocks come back within one step. If the loop itself fails, every stream gets
:class:`EngineDeadError` and ``on_dead`` is called (the server turns /health to 503 and exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmserve.engine.llm_engine import LLMEngine, OutputKind, RequestState
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served any more."""


class ShutdownError(RuntimeError):
    """The server is shutting down and the request ran out of the time it was given to finish."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue_, output in items:
        queue_.put_nowait(output)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self.on_dead = on_dead
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._pending_adds = 0
        self._pending_lock = threading.Lock()   # the counter moves on both threads
        self._stop = threading.Event()
        self._idle_reported = True
        self._aborted: list[RequestOutput] = []   # final outputs of aborted requests, for on_step (stats)
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llmserve-engine", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout)
        self.engine.shutdown()   # worker processes, if any

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead_error is None

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running (queued in the scheduler or on their way to it)."""
        return self.engine.num_waiting_requests + self._pending_adds

    # ------------------------------------------------------------------ requests (event-loop side)
    def prepare(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                arrival_time: float | None = None) -> RequestState:
        """Tokenise and validate (raises :class:`~llmserve.errors.InvalidRequestError`); queues nothing, so
        a request with several prompts can be checked whole before any of it runs."""
        if self.dead_error is not None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        return self.engine.prepare_request(request_id, prompt, params, arrival_time, OutputKind.DELTA)

    def submit(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        """Queue a prepared request now; iterate the result for its outputs (each holds only what is new).

        Closing the iterator before the request finishes (client gone, timeout) aborts it.
        """
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._pending_lock:
            self._pending_adds += 1
        self._commands.put(("add", (state, stream)))
        return self._outputs(state.request_id, stream)

    async def _outputs(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def abort_all(self, error: BaseException) -> None:
        """Abort every request queued or running (server shutdown); their streams raise ``error``."""
        self._commands.put(("abort_all", error))

    # ------------------------------------------------------------------ the loop (engine thread)
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                if self._stop.is_set():
                    break
                aborted, self._aborted = self._aborted, []
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                elif self._idle_reported and not aborted:
                    continue
                else:
                    outputs = []   # gone idle (e.g. after an abort): report the freed state once
                self._idle_reported = not self.engine.has_unfinished_requests()
                if self.on_step is not None:   # metrics first, so they include what clients receive next
                    self.on_step(self.engine, aborted + outputs)   # aborted ones: nobody to deliver to
                self._deliver(outputs)
        except BaseException as exc:   # noqa: BLE001 - whatever kills the loop kills the server
            logger.exception("engine loop died")
            self.dead_error = exc
            dead = EngineDeadError(f"the engine loop died: {type(exc).__name__}")
            for stream in self._streams.values():
                stream.put(dead)
            self._streams.clear()
            try:
                self.engine.shutdown()   # no worker process outlives a dead engine
            except Exception:   # noqa: BLE001 - already dying; the original error is what matters
                logger.exception("stopping the workers failed")
            if self.on_dead is not None:
                self.on_dead(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams with one wake-up per event loop, not one per request."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            batches.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _apply_commands(self, block: bool) -> None:
        """Apply every queued add/abort; when idle, wait for the next one."""
        while True:
            try:
                kind, payload = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                state, stream = payload
                self._add(state, stream)
                with self._pending_lock:
                    self._pending_adds -= 1
            elif kind == "abort":
                self._streams.pop(payload, None)
                self._abort(payload)
            elif kind == "abort_all":
                for request_id, stream in list(self._streams.items()):
                    stream.put(payload)
                    self._abort(request_id)
                self._streams.clear()

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort(request_id)
        if output is not None:
            self._aborted.append(output)

    def _add(self, state: RequestState, stream: _Stream) -> None:
        try:
            self.engine.enqueue(state)
        except Exception as exc:   # noqa: BLE001 - a bad request must not kill the loop
            stream.put(exc)
            return
        self._streams[state.request_id] = stream
