"""How every llmserve process logs: text for people, or with ``--log-format json`` one JSON object per line
for log pipelines (``time``, ``level``, ``logger``, ``message``, the ``request_id`` of per-request lines,
the ``process`` that wrote it, an ``exception`` when there is one). The server's engine-core and worker
processes are started with the same setup, so a deployment's logs are all one format."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogSetup:
    level: int = logging.INFO
    json: bool = False


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if getattr(record, "request_id", None) is not None:
            entry["request_id"] = record.request_id
        if self.process:
            entry["process"] = self.process
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def add_logging_args(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--log-level`` and ``--log-format``; ``defaults=False`` on a subcommand, so that a value given after it
    overrides the one before it (or the top-level default) and none leaves that one in place."""
    unset = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--log-level", choices=LOG_LEVELS, **({"default": "info"} | unset))
    parser.add_argument("--log-format", choices=["text", "json"], **({"default": "text"} | unset),
                        help="json: one JSON object per line, with the request id of per-request lines")


def setup_from_args(args: argparse.Namespace) -> LogSetup:
    return LogSetup(getattr(logging, args.log_level.upper()), args.log_format == "json")


def configure_logging(setup: LogSetup, process: str = "") -> None:
    """Send this process's logs to stderr in ``setup``'s format (replacing any earlier configuration);
    ``process`` names it (a worker's rank) in every line."""
    handler = logging.StreamHandler()
    if setup.json:
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(levelname)s %(asctime)s {process + ' ' if process else ''}"
                                               "%(name)s: %(message)s"))
    logging.basicConfig(level=setup.level, handlers=[handler], force=True)


def current_setup() -> LogSetup:
    """This process's setup, for the processes it starts."""
    root = logging.getLogger()
    is_json = any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    return LogSetup(root.getEffectiveLevel(), is_json)


def log_start_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """A start-up that failed: a configuration the checks refused (a ValueError naming the numbers, a model
    that is not there) is one line, its traceback only at debug level; anything else keeps its traceback."""
    if isinstance(exc, (ValueError, FileNotFoundError)):
        logger.error("%s: %s", what, exc)
        logger.debug("%s", what, exc_info=exc)
    else:
        logger.error("%s", what, exc_info=exc)
