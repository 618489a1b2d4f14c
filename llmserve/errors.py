"""Errors a caller can act on. ``param`` names the offending field (the HTTP server echoes it)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request was refused at admission; nothing of it was scheduled."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(FileNotFoundError):
    """The checkpoint named by ``--model`` / ``--tokenizer`` cannot be found or read; the message says why."""
