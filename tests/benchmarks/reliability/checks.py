"""Runs a reliability check the way ``llmserve bench ...`` does, and returns its report."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmserve.benchmarks.reliability.check_run import resolve_check_target
from llmserve.entrypoints.cli import build_parser
from tests.entrypoints.openai.conftest import RunningServer, launch


@contextmanager
def check_server(checkpoint: Path, log_dir: Path, *flags: str, wrapper: Path | None = None
                 ) -> Iterator[RunningServer]:
    """A server of its own for one check (its log and memory are part of what is checked)."""
    server = launch(checkpoint, *flags, log_dir=log_dir, wrapper=wrapper)
    try:
        yield server
    finally:
        server.stop()


def run_check(command: str, server: RunningServer, *flags: str) -> dict[str, Any]:
    args = build_parser().parse_args(["bench", command, "--base-url", server.base_url, "--vocab-size", "2000",
                                      "--server-pid", str(server.process.pid), *flags])
    function = {"soak": "run_soak", "abort-storm": "run_abort_storm", "overload": "run_overload"}[command]
    module = __import__(f"llmserve.benchmarks.reliability.{command.replace('-', '_')}", fromlist=[function])
    return asyncio.run(getattr(module, function)(args, resolve_check_target(args)))
