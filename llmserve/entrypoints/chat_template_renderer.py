"""Chat templates render in a process of their own, bounded in time and memory.

A chat template is Jinja code that comes with the checkpoint (or ``--chat-template``). transformers
renders it in Jinja's sandbox, which keeps it from files and Python internals but not from running
long or allocating without bound: ``{{ 'x' * 10**10 }}`` allocates 10 GB and nested loops over
``range(100000)`` run for hours, inside the server's event loop. Here the template runs in a child
process with an address-space limit (:data:`MEMORY_BUDGET_BYTES` above what it holds after start-up)
and a deadline (:data:`RENDER_TIMEOUT_S`); a render that overruns either is refused with
:class:`ChatTemplateLimitError` and the child is replaced, and the server goes on.

The child renders exactly as the server would (the same tokenizer object's ``apply_chat_template``,
``tokenize=False``) and returns text; requests and answers cross as JSON bytes, never pickles.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import threading
from multiprocessing.connection import Connection
from typing import Any

from llmserve.executor.parent_watch import exit_with_parent

RENDER_TIMEOUT_S = 10.0
MEMORY_BUDGET_BYTES = 1 << 30
STARTUP_TIMEOUT_S = 120.0


class ChatTemplateError(ValueError):
    """The template could not render these messages (its own error, or a limit)."""


class ChatTemplateLimitError(ChatTemplateError):
    """The template ran past the time or memory a render may take."""


def _virtual_memory_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _serve(conn: Connection, tokenizer: Any, memory_budget: int) -> None:
    exit_with_parent()
    limit = _virtual_memory_bytes() + memory_budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send_bytes(b"R")
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            text = tokenizer.apply_chat_template(request["conversation"], tools=request["tools"],
                                                 chat_template=request["chat_template"], tokenize=False,
                                                 add_generation_prompt=request["add_generation_prompt"],
                                                 **request["template_kwargs"])
            conn.send_bytes(b"T" + text.encode("utf-8", "surrogatepass"))
        except MemoryError:
            conn.send_bytes(b"M")
        except Exception as exc:   # noqa: BLE001 - the template's own error, reported to the client
            conn.send_bytes(b"E" + f"{type(exc).__name__}: {exc}".encode())


class ChatTemplateRenderer:
    """Renders through a child process, one render at a time; started by :meth:`start` (or the first
    render) and replaced whenever a render overruns its limits."""

    def __init__(self, tokenizer: Any, timeout: float = RENDER_TIMEOUT_S,
                 memory_budget: int = MEMORY_BUDGET_BYTES) -> None:
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.memory_budget = memory_budget
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def render(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               chat_template: str | None, add_generation_prompt: bool,
               template_kwargs: dict[str, Any] | None) -> str:
        """The prompt text (blocking: call it off the event loop)."""
        request = json.dumps({"conversation": conversation, "tools": tools, "chat_template": chat_template,
                              "add_generation_prompt": add_generation_prompt,
                              "template_kwargs": template_kwargs or {}}).encode()
        with self._lock:
            conn = self._ensure_started()
            conn.send_bytes(request)
            if not conn.poll(self.timeout):
                self._stop()
                raise ChatTemplateLimitError(f"the chat template did not finish within {self.timeout:g} s")
            try:
                answer = conn.recv_bytes()
            except (EOFError, OSError):
                self._stop()
                raise ChatTemplateLimitError("the chat template's renderer died (it ran out of the "
                                             f"{self.memory_budget >> 20} MiB it may use)") from None
        tag, body = answer[:1], answer[1:]
        if tag == b"T":
            return body.decode("utf-8", "surrogatepass")
        if tag == b"M":
            self.close()   # a process that hit its limit is not trusted to have recovered
            raise ChatTemplateLimitError(f"the chat template used more than the {self.memory_budget >> 20} MiB "
                                         "it may use")
        raise ChatTemplateError(body.decode(errors="replace"))

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_started(self) -> Connection:
        if self._conn is not None and self._process is not None and self._process.is_alive():
            return self._conn
        self._stop()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, self.tokenizer, self.memory_budget),
                              name="llmserve-chat-template", daemon=True)
        process.start()
        child.close()
        try:
            ready = parent.recv_bytes() if parent.poll(STARTUP_TIMEOUT_S) else b""
        except (EOFError, OSError):
            ready = b""
        if ready != b"R":
            process.kill()
            raise RuntimeError("the chat template renderer did not start")
        self._process, self._conn = process, parent
        return parent

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5.0)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
