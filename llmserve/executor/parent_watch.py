"""A child process of the engine exits as soon as its parent is gone.

A killed parent closes no pipe in time and ``PR_SET_PDEATHSIG`` fires when the parent *thread* that
started the child exits (the server starts the engine core from a loader thread), so a watcher thread
polls the parent pid instead.
"""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(poll_s: float = 0.5) -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="llmserve-parent-watch", daemon=True).start()
