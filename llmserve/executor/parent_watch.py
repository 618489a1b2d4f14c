"""A child process of the engine exits as soon as its parent is gone.

A killed parent closes no pipe in time and ``PR_SET_PDEATHSIG`` fires when the parent *thread* that
started the child exits (the server starts the engine core from a loader thread), so a watcher thread
polls the parent pid. A thread cannot end a process that is stopped or stuck in C code holding the GIL: where
the child was started from its parent's main thread (the engine core starts its workers so), the kernel kills it
as well (:func:`die_with_parent`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``PR_SET_PDEATHSIG(SIGKILL)`` on Linux: the kernel kills this process, stopped or hung, when the thread that
    started it exits. Only for a child started from its parent's main thread, whose exit is the process's."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_with_parent(poll_s: float = 0.5) -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="llmserve-parent-watch", daemon=True).start()
