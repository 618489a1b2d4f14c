"""The body of a worker process: build the rank's worker, then answer the executor until told to stop.

Replies are one tag byte and a body: ``R`` + JSON (a control call's result, or ready), ``O`` + msgpack (the
driver's step output), ``N`` (a step done on a non-driver rank), ``X`` + text (the step failed; the rank
carries on), ``F`` + text (this rank cannot go on).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection

from llmserve.config import EngineConfig
from llmserve.engine.messages import SchedulerOutput, decode, encode
from llmserve.worker.worker import Worker, WorkerPlacement

logger = logging.getLogger(__name__)

_CONTROL_CALLS = ("available_kv_blocks", "kv_cache_bytes_per_block", "initialize_cache")


def _exit_with_parent() -> None:
    """Exit as soon as the engine process is gone (a killed parent closes no pipe of ours in time)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="llmserve-parent-watch", daemon=True).start()


def worker_main(conn: Connection, config: EngineConfig, rank: int, init_method: str, max_model_len: int,
                max_num_batched_tokens: int) -> None:
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
    placement = WorkerPlacement(rank, config.tensor_parallel_size, config.pipeline_parallel_size, init_method)
    try:
        worker = Worker(config, placement, max_model_len, max_num_batched_tokens)
        worker.init_device()
        worker.load_model()
    except Exception as exc:   # noqa: BLE001 - reported to the engine, which fails start-up with it
        conn.send_bytes(b"F" + f"{type(exc).__name__}: {exc}".encode())
        return
    conn.send_bytes(b"Rnull")
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return   # the engine is gone
        tag, body = message[:1], message[1:]
        if tag == b"Q":
            return
        if tag == b"C":
            method, args = json.loads(body)
            try:
                if method not in _CONTROL_CALLS:
                    raise ValueError(f"unknown worker call {method!r}")
                conn.send_bytes(b"R" + json.dumps(getattr(worker, method)(*args)).encode())
            except Exception as exc:   # noqa: BLE001
                conn.send_bytes(b"F" + f"{method}: {type(exc).__name__}: {exc}".encode())
                return
        elif tag == b"E":
            try:
                output = worker.execute_model(decode(body, SchedulerOutput))
            except Exception as exc:   # noqa: BLE001 - the scheduler isolates the request it fails on
                logger.warning("step failed: %s", traceback.format_exc(limit=3))
                conn.send_bytes(b"X" + f"{type(exc).__name__}: {exc}".encode())
                continue
            conn.send_bytes(b"N" if output is None else b"O" + encode(output))
