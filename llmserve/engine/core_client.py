"""The engine core in a process of its own, so the front end's per-token work (HTTP, SSE, detokenising)
never takes the GIL or a core from the step loop (vLLM V1's layout).

Two one-way pipes carry msgpack messages: requests and aborts in, :class:`EngineCoreOutputs` out. The core
reads on a receiver thread. The front end's event loop writes a message itself when that cannot block and
keeps the order (it fits one atomic pipe write, the pipe has room for it, nothing queued is still unwritten);
anything else (a long prompt) goes through a sender thread, so the loop never waits on the core to take it.
A message written in place costs one write: no thread wake-up, no hand-over of the GIL. The front end
acknowledges the output messages once it has handed them to the streams, and the core never has more than
:data:`MAX_STEPS_AHEAD` unacknowledged: a front end that falls behind (detokenising and writing SSE for many
streams) slows the steps down instead of letting a backlog build in the pipe, where a client's disconnect
would wait behind seconds of tokens while the core kept computing for it. A front end that fell a step
behind reads both messages and acknowledges them together.

The core applies what came in between two steps, and at once while it waits for an acknowledgement, so
an aborted request's blocks are free at the end of the step in flight when its abort came, at the latest.
Each abort's wait, in steps and seconds from the receiver thread taking it off the pipe to the request
stopping, goes out with the next message (:class:`~llmserve.engine.messages.AbortDelay`; the
``llmserve:abort_latency_*`` metrics). The core process is spawned, never forked: a fork would inherit the
server's listening socket and its threads' locks. It exits when its parent does.

Tags: in ``A`` + request, ``B`` + JSON ``[request_id, index]`` (abort), ``K`` + count (that many output
messages were processed), ``M`` + JSON ``max_cells`` (a block map, answered between two steps), ``Q`` (stop); out ``R`` +
JSON (ready: the KV-cache size), ``O`` + outputs, ``F`` + text (the core failed and exited).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import select
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from llmserve.config import EngineConfig
from llmserve.engine.messages import AbortDelay, EngineCoreOutputs, EngineCoreRequest, decode, encode
from llmserve.executor.parent_watch import exit_with_parent
from llmserve.logging_setup import LogSetup, configure_logging, current_setup, log_start_failure

if TYPE_CHECKING:
    from llmserve.engine.core import EngineCore

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 3600.0   # loading a large checkpoint, or downloading it
# One step's outputs being processed by the front end while the core computes the next: full overlap
# when the front end keeps up, and a bounded lag when it does not.
MAX_STEPS_AHEAD = 2


class Received(NamedTuple):
    """A message from the front end, stamped when the core's receiver thread took it off the pipe."""

    message: bytes
    num_steps: int   # the core's steps finished by then
    time: float      # time.monotonic()


class EngineCoreDiedError(RuntimeError):
    """The engine-core process failed or exited."""


class EngineCoreClient:
    """The front end's handle on the core process."""

    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        """Start the core process on ``config`` (whose model is at ``model_path``, already fetched). The core
        reads the checkpoint's config itself, so the front end can read it at the same time (each takes
        seconds of imports) instead of before."""
        self.model_path = model_path
        ctx = multiprocessing.get_context("spawn")
        in_recv, self._in = ctx.Pipe(duplex=False)
        self._out, out_send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=run_engine_core, name="llmserve-engine-core",
                                   args=(in_recv, out_send, config, current_setup()))
        self.process.start()
        in_recv.close()
        out_send.close()
        self._start_pipes()
        self.num_kv_blocks: int | None = None
        self.group_windows: list[int | None] = [None]   # the block manager's

    def _start_pipes(self) -> None:
        """The writing side's state and sender thread, and the pollers, once ``_in`` and ``_out`` are open."""
        self._sends: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writing = threading.Lock()   # one message at a time on the pipe (the sender's, or the loop's)
        self._queued = 0                   # messages handed to the sender thread (under _queuing) ...
        self._written = 0                  # ... and those it wrote (under _writing)
        self._queuing = threading.Lock()
        self._writable = select.poll()     # POLLOUT: room for one atomic write (PIPE_BUF bytes)
        self._writable.register(self._in.fileno(), select.POLLOUT)
        self._readable = select.poll()
        self._readable.register(self._out.fileno(), select.POLLIN)
        self._sender = threading.Thread(target=self._send_loop, name="llmserve-core-send", daemon=True)
        self._sender.start()

    def wait_until_ready(self) -> int:
        """Block until the core has loaded the model and sized its KV cache; its number of blocks. Starting
        the process and waiting for it are apart so the front end's own start-up overlaps the core's."""
        if self.num_kv_blocks is None:
            ready = self._receive(STARTUP_TIMEOUT_S)
            if ready[:1] != b"R":
                self.process.join(5.0)
                raise EngineCoreDiedError(ready[1:].decode() if ready[:1] == b"F"
                                          else "the engine core did not start")
            ready_info = json.loads(ready[1:])
            self.group_windows = ready_info["group_windows"]
            self.num_kv_blocks = int(ready_info["num_kv_blocks"])
        return self.num_kv_blocks

    # ------------------------------------------------------------------ to the core
    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(b"A" + encode(request))

    def abort(self, request_id: str, index: int | None = None) -> None:
        self._send(b"B" + json.dumps([request_id, index]).encode())

    def ack(self, count: int = 1) -> None:
        """``count`` more output messages have been processed (lets the core run as many steps further)."""
        self._send(b"K%d" % count)

    def request_block_map(self, max_cells: int) -> None:
        """Ask for the KV cache's :class:`~llmserve.engine.messages.BlockMap`; it comes back with the outputs."""
        self._send(b"M" + json.dumps(max_cells).encode())

    def _send(self, message: bytes) -> None:
        """Write ``message`` now if that cannot block and keeps the order, else queue it for the sender thread.

        A write of at most ``PIPE_BUF`` bytes (with its 4-byte length) into a pipe that polls writable is
        atomic and does not block; the count of queued against written messages says nothing is ahead of it."""
        if len(message) + 4 <= select.PIPE_BUF and self._writing.acquire(blocking=False):
            try:
                if self._queued == self._written and self._writable.poll(0):
                    try:
                        self._in.send_bytes(message)
                    except (OSError, ValueError):
                        pass   # the core is gone; the output side reports it
                    return
            finally:
                self._writing.release()
        self._enqueue(message)

    def _enqueue(self, message: bytes) -> None:
        with self._queuing:
            self._queued += 1
        self._sends.put(message)

    def _send_loop(self) -> None:
        while (message := self._sends.get()) is not None:
            try:
                with self._writing:
                    self._in.send_bytes(message)
                    self._written += 1
            except (OSError, ValueError):
                return   # the core is gone; the output side reports it

    # ------------------------------------------------------------------ from the core
    def fileno(self) -> int:
        """Readable when the core has sent something (for an event loop's ``add_reader``)."""
        return self._out.fileno()

    def receive(self) -> EngineCoreOutputs:
        """The next step's outputs (blocks until they come); raises :class:`EngineCoreDiedError`."""
        message = self._receive(None)
        if message[:1] != b"O":
            raise EngineCoreDiedError(message[1:].decode() if message[:1] == b"F" else "unexpected message")
        return decode(message[1:], EngineCoreOutputs)

    def receive_all(self) -> list[EngineCoreOutputs]:
        """The next message and those already behind it in the pipe, up to :data:`MAX_STEPS_AHEAD` in all (as
        many as a busy core sends before it waits for an acknowledgement); raises :class:`EngineCoreDiedError`."""
        messages = [self.receive()]
        while len(messages) < MAX_STEPS_AHEAD and self._readable.poll(0):   # (Connection.poll builds a selector)
            messages.append(self.receive())
        return messages

    def _receive(self, timeout: float | None) -> bytes:
        if timeout is not None and not self._out.poll(timeout):
            raise EngineCoreDiedError(f"the engine core did not answer within {timeout:.0f} s")
        try:
            return self._out.recv_bytes()
        except (EOFError, OSError):
            self.process.join(1.0)
            raise EngineCoreDiedError(f"the engine-core process exited (exit code {self.process.exitcode})") from None

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            self._enqueue(b"Q")
        self._sends.put(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1.0)


def run_engine_core(inputs: Connection, outputs: Connection, config: EngineConfig, log_setup: LogSetup) -> None:
    """The core process: build the core, then step while there is work, applying requests between steps."""
    exit_with_parent()
    configure_logging(log_setup, "engine-core")
    try:
        core = build_engine_core(config)
    except BaseException as exc:   # noqa: BLE001 - reported to the front end, which fails start-up with it
        log_start_failure(logger, "the engine core failed to start", exc)
        outputs.send_bytes(b"F" + f"{type(exc).__name__}: {exc}".encode())
        return
    outputs.send_bytes(b"R" + json.dumps({"num_kv_blocks": core.block_manager.num_blocks,
                                          "group_windows": core.block_manager.group_windows}).encode())
    received: queue.SimpleQueue[Received] = queue.SimpleQueue()

    def receive_loop() -> None:
        while True:
            try:
                message = inputs.recv_bytes()
            except (EOFError, OSError):
                message = b"Q"
            received.put(Received(message, core.num_steps, time.monotonic()))
            if message == b"Q":
                return

    threading.Thread(target=receive_loop, name="llmserve-core-receive", daemon=True).start()
    try:
        _core_loop(core, received, outputs)
    except BaseException as exc:   # noqa: BLE001 - whatever kills the loop kills the engine
        logger.exception("the engine-core loop died")
        try:
            outputs.send_bytes(b"F" + f"{type(exc).__name__}: {exc}".encode())
        except OSError:
            pass
        core.shutdown()
        os._exit(1)
    core.shutdown()
    logging.shutdown()
    os._exit(0)   # nothing left to clean up; the interpreter's own teardown would only delay the server's exit


def build_engine_core(config: EngineConfig) -> EngineCore:
    """The core process's engine core: it reads the checkpoint's config for its limits, never the tokenizer
    (the front end tokenises and detokenises)."""
    from llmserve.engine.core import EngineCore   # here, in the core process: the front end's entry point
    from llmserve.engine.input_processor import ModelConfigInfo   # imports this module before torch loads

    info = ModelConfigInfo(config)
    core = EngineCore(config, info.max_model_len, info.max_num_batched_tokens, report_stats=True)
    info.log_dtype_choice()
    return core


def _core_loop(core: EngineCore, received: queue.SimpleQueue[Received], outputs: Connection) -> None:
    report_idle = False   # after an abort while idle, send the freed state once (gauges)
    unacked = 0           # output messages the front end has not processed yet
    aborting: dict[tuple[str, int | None], Received] = {}   # aborts whose request has not stopped yet
    aborts: list[AbortDelay] = []   # aborts whose request stopped since the last message out, which carries them

    def send(message: EngineCoreOutputs) -> None:
        nonlocal unacked
        message.aborts = aborts[:]
        aborts.clear()
        outputs.send_bytes(b"O" + encode(message))
        unacked += 1

    def note_stopped() -> None:
        """Time the aborts whose request no longer runs: its blocks are free."""
        for key, item in list(aborting.items()):
            if not core.is_unfinished(*key):
                del aborting[key]
                aborts.append(AbortDelay(core.num_steps - item.num_steps, time.monotonic() - item.time))

    while True:
        first = True
        while True:   # apply what came in: wait for something when idle, for an ack when too far ahead
            busy = core.has_unfinished_requests()
            try:
                item = received.get(block=(first and not busy) or (busy and unacked >= MAX_STEPS_AHEAD))
            except queue.Empty:
                break
            first = False
            tag, body = item.message[:1], item.message[1:]
            if tag == b"Q":
                return
            if tag == b"K":
                unacked -= int(body)
            elif tag == b"A":
                request: Any = decode(body, EngineCoreRequest)
                try:
                    core.add_request(request)
                except ValueError as exc:
                    send(EngineCoreOutputs(failed={request.request_id: str(exc)}))
            elif tag == b"B":
                request_id, index = json.loads(body)
                if core.is_unfinished(request_id, index):
                    aborting[(request_id, index)] = item
                core.abort(request_id, index)
                note_stopped()
                report_idle = True
            elif tag == b"M":
                block_map = core.block_manager.block_map(json.loads(body))
                send(EngineCoreOutputs(stats=core.stats(), block_map=block_map))
        if core.has_unfinished_requests():
            step = core.step()
            if aborting:
                note_stopped()
            if step.stats is not None:   # None: nothing was scheduled
                send(step)
                report_idle = False
        elif report_idle:
            send(EngineCoreOutputs(stats=core.stats()))
            report_idle = False
