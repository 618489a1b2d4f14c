"""Log formats: text by default; ``--log-format json`` writes one JSON object per line with the time, level,
logger, message, the request id of per-request lines, the process and any exception."""

from __future__ import annotations

import argparse
import json
import logging

from llmserve.logging_setup import JsonFormatter, LogSetup, add_logging_args, current_setup, setup_from_args


def _record(**extra) -> logging.LogRecord:
    record = logging.LogRecord("llmserve.api", logging.INFO, __file__, 1, "request %s finished", ("r-1",), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_the_request_id_and_the_process():
    entry = json.loads(JsonFormatter("rank1").format(_record(request_id="r-1")))
    assert entry["message"] == "request r-1 finished" and entry["request_id"] == "r-1"
    assert (entry["level"], entry["logger"], entry["process"]) == ("INFO", "llmserve.api", "rank1")
    assert entry["time"].endswith("+00:00")
    assert "request_id" not in json.loads(JsonFormatter().format(_record()))


def test_exceptions_are_one_json_field():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_flags_and_the_setup_handed_to_child_processes():
    parser = argparse.ArgumentParser()
    add_logging_args(parser)
    assert setup_from_args(parser.parse_args([])) == LogSetup(logging.INFO, False)
    assert setup_from_args(parser.parse_args(["--log-format", "json", "--log-level", "debug"])) == LogSetup(
        logging.DEBUG, True)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        root.handlers[:] = [handler]
        root.setLevel(logging.WARNING)
        assert current_setup() == LogSetup(logging.WARNING, True)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
