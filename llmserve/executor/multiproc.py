"""One worker process per rank on this machine, driven over pipes.

Every step the same msgpack-encoded :class:`~llmserve.engine.messages.SchedulerOutput` goes to every
rank (no pickle of anything a client sent); the driver rank answers with the encoded output, the others
with an acknowledgement. Control calls (KV-cache sizing, allocation) are JSON. The parent waits on the
pipes and on the processes' sentinels at once, so a worker that dies is noticed at once and one that
hangs within ``LLMSERVE_EXECUTE_MODEL_TIMEOUT_SECONDS``; either way the engine is dead
(:class:`~llmserve.executor.abstract.WorkerDiedError`) and every worker left is killed. Workers die with their
parent: the kernel kills them when the engine's process exits (``PR_SET_PDEATHSIG``, which also ends a stopped or
hung worker; set where the executor is built on the main thread, as in the engine-core process), a watcher thread
when the parent pid changes, and a closed pipe ends the loop; so none is orphaned.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import socket
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from llmserve.config import EngineConfig
from llmserve.engine.messages import SchedulerOutput, encode
from llmserve.executor.abstract import STARTUP_TIMEOUT_S, MultiRankExecutor, WorkerDiedError, ready_bodies
from llmserve.executor.worker_process import worker_main
from llmserve.logging_setup import current_setup

logger = logging.getLogger(__name__)

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MultiprocExecutor(MultiRankExecutor):
    def __init__(self, config: EngineConfig, max_model_len: int, max_num_batched_tokens: int) -> None:
        super().__init__(config, max_model_len, max_num_batched_tokens)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = multiprocessing.get_context("spawn")
        # The kernel kills a worker with the thread that started it: only the main thread's exit is the process's.
        kill_with_parent = threading.current_thread() is threading.main_thread()
        self.processes: list[Any] = []
        self.pipes: list[Connection] = []
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"llmserve-worker-{rank}",
                               args=(child, config, rank, init_method, max_model_len, max_num_batched_tokens,
                                     current_setup(), kill_with_parent),
                               daemon=True)
            proc.start()
            child.close()
            self.processes.append(proc)
            self.pipes.append(parent)
        try:
            ready_bodies(self._collect(STARTUP_TIMEOUT_S))   # every rank reports ready (model loaded)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ calls
    def _control_replies(self, method: str, args: list[Any]) -> list[bytes]:
        self._send(b"C" + json.dumps([method, args]).encode())
        return self._collect(STARTUP_TIMEOUT_S)

    def _step_replies(self, sched: SchedulerOutput) -> list[bytes]:
        self._send(b"E" + encode(sched))
        return self._collect(self.execute_timeout)

    def _send(self, payload: bytes) -> None:
        for rank, pipe in enumerate(self.pipes):
            try:
                pipe.send_bytes(payload)
            except (OSError, ValueError):
                raise WorkerDiedError(f"worker rank {rank} closed its pipe") from None

    def _collect(self, timeout: float) -> list[bytes]:
        """One reply from every rank, in rank order; raises WorkerDiedError if a rank dies or is silent."""
        replies: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size:
            waiting = {self.pipes[r]: r for r in range(self.world_size) if r not in replies}
            sentinels = {self.processes[r].sentinel: r for r in waiting.values()}
            left = deadline - time.monotonic()
            ready = wait([*waiting, *sentinels], timeout=max(0.0, left)) if left > 0 else []
            if not ready:
                raise WorkerDiedError(f"worker rank(s) {sorted(waiting.values())} did not answer within {timeout:.0f} s")
            for obj in ready:
                if obj in waiting:
                    rank = waiting[obj]
                    try:
                        reply = obj.recv_bytes()
                    except (EOFError, OSError):
                        raise WorkerDiedError(f"worker rank {rank} closed its pipe") from None
                    if reply[:1] == b"F":
                        raise WorkerDiedError(f"worker rank {rank} failed: {reply[1:].decode()}")
                    replies[rank] = reply
                else:
                    rank = sentinels[obj]
                    if rank not in replies and not self.pipes[rank].poll():
                        self.processes[rank].join(1.0)   # its sentinel can close just before its exit status is there
                        code = self.processes[rank].exitcode
                        raise WorkerDiedError(f"worker rank {rank} exited (exit code {code})")
        return [replies[r] for r in range(self.world_size)]

    def shutdown(self) -> None:
        """Ask every worker to stop and give them a few seconds; a dead engine's are killed at once (one may
        hang in a collective on its dead peer, or be stopped)."""
        for pipe in self.pipes:
            try:
                pipe.send_bytes(b"Q")
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + (0.0 if self.dead else 5.0)
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for pipe in self.pipes:
            pipe.close()
        self.processes, self.pipes = [], []
