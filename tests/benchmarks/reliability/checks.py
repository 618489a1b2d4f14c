"""Runs a reliability check the way ``llmserve bench ...`` does, and returns its report."""

from __future__ import annotations

import asyncio
from typing import Any

from llmserve.benchmarks.reliability.check_run import resolve_check_target
from llmserve.entrypoints.cli import build_parser
from tests.entrypoints.openai.conftest import RunningServer


def run_check(command: str, server: RunningServer, *flags: str) -> dict[str, Any]:
    args = build_parser().parse_args(["bench", command, "--base-url", server.base_url, "--vocab-size", "2000",
                                      "--server-pid", str(server.process.pid), *flags])
    function = {"soak": "run_soak", "abort-storm": "run_abort_storm", "overload": "run_overload"}[command]
    module = __import__(f"llmserve.benchmarks.reliability.{command.replace('-', '_')}", fromlist=[function])
    return asyncio.run(getattr(module, function)(args, resolve_check_target(args)))
