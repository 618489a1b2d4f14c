"""Servers shared by test modules: one per (checkpoint, flags), started the first time a module asks for it.

A server takes seconds to start (three processes importing torch and transformers on a busy machine), and
most server tests only send requests and check their own answers. Those share one server per configuration
for the whole session. A test that needs a server of its own (counters from zero, its log, its memory, its
signals or its death) keeps using ``start_server`` or ``launch``."""

from __future__ import annotations

import signal
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tests.entrypoints.openai.conftest import RunningServer, launch

# Each server is three processes (front end, engine core, chat-template renderer), about 0.75 GiB together.
# The servers a module holds stay up; of the others, the most recently used few wait for a later module.
MAX_IDLE = 2

Key = tuple[str, tuple[str, ...]]


@dataclass
class _Entry:
    server: RunningServer
    holders: int = 0


class ServerRegistry:
    """``acquire(*flags, model=None)`` -> the running server for that checkpoint and those flags, held until
    ``release``; an idle one is stopped only to keep at most ``max_idle`` idle servers."""

    def __init__(self, default_model: Path, log_dir: Path, max_idle: int = MAX_IDLE) -> None:
        self.default_model = default_model
        self.log_dir = log_dir
        self.max_idle = max_idle
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()   # least recently acquired first

    def key(self, *flags: str, model: Path | None = None) -> Key:
        return str(model or self.default_model), flags

    def acquire(self, key: Key) -> RunningServer:
        entry = self._entries.get(key)
        if entry is None or entry.server.process.poll() is not None:
            # new, or it exited (whatever stopped it failed its own test): start a fresh one
            entry = _Entry(launch(Path(key[0]), *key[1], log_dir=self.log_dir), entry.holders if entry else 0)
            self._entries[key] = entry
        entry.holders += 1
        self._entries.move_to_end(key)
        return entry.server

    def release(self, key: Key) -> None:
        self._entries[key].holders -= 1
        idle = [k for k, e in self._entries.items() if e.holders == 0]
        for stale in idle[:max(0, len(idle) - self.max_idle)]:
            _stop(self._entries.pop(stale).server)

    def stop_all(self) -> None:
        while self._entries:
            _stop(self._entries.popitem()[1].server)


def _stop(server: RunningServer) -> None:
    """Killed, as ``start_server`` kills its servers: no test here checks a graceful exit."""
    server.stop(signal.SIGKILL)
