"""The body of a worker process: build the rank's worker, then answer the executor until told to stop.

Replies are one tag byte and a body: ``R`` + JSON (a control call's result, or ready), ``O`` + msgpack (the
driver's step output), ``N`` (a step done on a non-driver rank), ``X`` + text (the step failed; the rank
carries on), ``F`` + text (this rank cannot go on).
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from multiprocessing.connection import Connection

from llmserve.config import EngineConfig
from llmserve.engine.messages import SchedulerOutput, decode, encode
from llmserve.executor.parent_watch import die_with_parent, exit_with_parent
from llmserve.logging_setup import LogSetup, configure_logging
from llmserve.worker.worker import Worker, WorkerPlacement

logger = logging.getLogger(__name__)

_CONTROL_CALLS = ("available_kv_blocks", "kv_cache_bytes_per_block", "kv_cache_group_windows", "multi_step_max_rows",
                  "initialize_cache", "recover_after_failed_step", "measure_step_times")


class WorkerEndpoint:
    """A rank's side of the executor protocol, whatever carries the bytes (a pipe, a Ray actor call)."""

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def start(self, config: EngineConfig, placement: WorkerPlacement, max_model_len: int,
              max_num_batched_tokens: int) -> bytes:
        """Threads, process groups, weights: ``R`` when ready, ``F`` + text when this rank cannot start."""
        try:
            worker = Worker(config, placement, max_model_len, max_num_batched_tokens)
            worker.init_device()
            worker.load_model()
        except Exception as exc:   # noqa: BLE001 - reported to the engine, which fails start-up with it
            return b"F" + f"{type(exc).__name__}: {exc}".encode()
        self.worker = worker
        return b"Rnull"

    def control(self, method: str, args: list) -> bytes:
        """A control call: ``R`` + its JSON result, or ``F`` + text."""
        try:
            if method not in _CONTROL_CALLS:
                raise ValueError(f"unknown worker call {method!r}")
            return b"R" + json.dumps(getattr(self.worker, method)(*args)).encode()
        except Exception as exc:   # noqa: BLE001
            return b"F" + f"{method}: {type(exc).__name__}: {exc}".encode()

    def execute(self, payload: bytes) -> bytes:
        """One step from the encoded SchedulerOutput: ``O`` + encoded output (driver), ``N``, or ``X`` + text."""
        assert self.worker is not None
        try:
            output = self.worker.execute_model(decode(payload, SchedulerOutput))
        except Exception as exc:   # noqa: BLE001 - the scheduler isolates the request it fails on
            logger.warning("step failed: %s", traceback.format_exc(limit=3))
            return b"X" + f"{type(exc).__name__}: {exc}".encode()
        return b"N" if output is None else b"O" + encode(output)


def worker_main(conn: Connection, config: EngineConfig, rank: int, init_method: str, max_model_len: int,
                max_num_batched_tokens: int, log_setup: LogSetup, kill_with_parent: bool = False) -> None:
    """``kill_with_parent``: have the kernel kill this process when its parent exits (see
    :func:`~llmserve.executor.parent_watch.die_with_parent`)."""
    if kill_with_parent:
        die_with_parent()
    exit_with_parent()
    configure_logging(log_setup, f"rank{rank}")
    endpoint = WorkerEndpoint()
    placement = WorkerPlacement(rank, config.tensor_parallel_size, config.pipeline_parallel_size, init_method)
    ready = endpoint.start(config, placement, max_model_len, max_num_batched_tokens)
    conn.send_bytes(ready)
    if ready[:1] == b"R":
        _serve(conn, endpoint)
    logging.shutdown()
    # Nothing is left to clean up (the shared-memory segments were unlinked once mapped), and the interpreter's
    # own teardown after importing torch takes seconds: the executor's shutdown would wait for it, as the
    # engine core's exit would (which ends the same way).
    os._exit(0)


def _serve(conn: Connection, endpoint: WorkerEndpoint) -> None:
    """Answer the executor until it says stop, goes away, or this rank cannot go on."""
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return   # the engine is gone
        tag, body = message[:1], message[1:]
        if tag == b"Q":
            return
        if tag == b"C":
            reply = endpoint.control(*json.loads(body))
            conn.send_bytes(reply)
            if reply[:1] == b"F":
                return
        elif tag == b"E":
            conn.send_bytes(endpoint.execute(body))
