"""Chat templates render in a process of their own, bounded in time and memory.

A chat template is Jinja code that comes with the checkpoint (or ``--chat-template``). transformers
renders it in Jinja's sandbox, which keeps it from files and Python internals but not from running
long or allocating without bound: ``{{ 'x' * 10**10 }}`` allocates 10 GB and nested loops over
``range(100000)`` run for hours, inside the server's event loop. Here the template runs in a child
process with an address-space limit (:data:`MEMORY_BUDGET_BYTES` above what it holds after start-up)
and a deadline (:data:`RENDER_TIMEOUT_S`); a render that overruns either is refused with
:class:`ChatTemplateLimitError` and the child is replaced, and the server goes on.

The child renders exactly as the server would (the tokenizer loaded as the server loads it, its
``apply_chat_template`` with ``tokenize=False``) and returns text; requests and answers cross as JSON
bytes, never pickles. It is a fresh interpreter importing no torch, so it starts quickly and holds
little memory.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import resource
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from llmserve.executor.parent_watch import exit_with_parent

RENDER_TIMEOUT_S = 10.0
MEMORY_BUDGET_BYTES = 1 << 30
STARTUP_TIMEOUT_S = 120.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])   # the folder holding this ``llmserve`` package


def renderer_parameters(tokenizer: Any) -> frozenset[str]:
    """``apply_chat_template``'s own parameters (``tokenize``, ``chat_template``...): a request's
    ``chat_template_kwargs`` are template variables and may not set them."""
    signature = inspect.signature(tokenizer.apply_chat_template)
    return frozenset(name for name, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


class ChatTemplateError(ValueError):
    """The template could not render these messages (its own error, or a limit)."""


class ChatTemplateLimitError(ChatTemplateError):
    """The template ran past the time or memory a render may take."""


def _virtual_memory_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _load_tokenizer(args: dict[str, Any]) -> Any:
    """The server's tokenizer class, loaded directly: ``AutoTokenizer`` would read the model's config
    through transformers' model registry, which imports torch. ``load_tokenizer`` where that cannot work
    (GGUF files, classes from a checkpoint's own code)."""
    from llmserve.tokenizer import load_tokenizer

    module, _, name = (args.pop("tokenizer_class") or "").partition(":")
    if module.startswith("transformers.") and not args["path"].endswith(".gguf"):
        try:
            cls = getattr(importlib.import_module(module), name)
            return cls.from_pretrained(args["path"], revision=args["revision"],
                                       trust_remote_code=args["trust_remote_code"])
        except (ImportError, AttributeError, OSError, ValueError):
            pass
    return load_tokenizer(**args)


def _serve(conn: Connection, tokenizer_args: dict[str, Any], memory_budget: int) -> None:
    """The child: load the tokenizer, then render until the parent closes the connection."""
    exit_with_parent()
    try:
        tokenizer = _load_tokenizer(tokenizer_args)
    except Exception as exc:   # noqa: BLE001 - reported to the parent, which fails start-up with it
        conn.send_bytes(b"F" + f"{type(exc).__name__}: {exc}".encode())
        return
    limit = _virtual_memory_bytes() + memory_budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send_bytes(b"R")
    while True:
        try:
            request = json.loads(conn.recv_bytes())
        except (EOFError, OSError):   # the server closed the connection or is gone
            return
        try:
            text = tokenizer.apply_chat_template(request["conversation"], tools=request["tools"],
                                                 chat_template=request["chat_template"], tokenize=False,
                                                 add_generation_prompt=request["add_generation_prompt"],
                                                 continue_final_message=request["continue_final_message"],
                                                 **request["template_kwargs"])
            conn.send_bytes(b"T" + text.encode("utf-8", "surrogatepass"))
        except MemoryError:
            conn.send_bytes(b"M")
        except Exception as exc:   # noqa: BLE001 - the template's own error, reported to the client
            conn.send_bytes(b"E" + f"{type(exc).__name__}: {exc}".encode())


class ChatTemplateRenderer:
    """Renders through a child process, one render at a time; started by :meth:`start` (or the first
    render) and replaced whenever a render overruns its limits.

    It takes :func:`~llmserve.tokenizer.load_tokenizer`'s arguments and the class that loaded, not a
    tokenizer object: the child loads its own.
    """

    def __init__(self, tokenizer_path: str | Path, revision: str | None = None, trust_remote_code: bool = False,
                 tokenizer_class: type | None = None, timeout: float = RENDER_TIMEOUT_S,
                 memory_budget: int = MEMORY_BUDGET_BYTES) -> None:
        self.tokenizer_args = {"path": str(tokenizer_path), "revision": revision,
                               "trust_remote_code": trust_remote_code,
                               "tokenizer_class": tokenizer_class and f"{tokenizer_class.__module__}:"
                                                                      f"{tokenizer_class.__qualname__}"}
        self.timeout = timeout
        self.memory_budget = memory_budget
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ready = False

    def start(self) -> None:
        """Launch the child without waiting for it (its start-up overlaps the caller's; the first render,
        or :meth:`wait_started`, waits)."""
        with self._lock:
            if self._process is None:
                self._launch()

    def wait_started(self) -> None:
        """Block until the child is ready; raise if it could not start (e.g. the tokenizer fails to load)."""
        with self._lock:
            self._ensure_started()

    def render(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               chat_template: str | None, add_generation_prompt: bool,
               template_kwargs: dict[str, Any] | None, continue_final_message: bool = False) -> str:
        """The prompt text (blocking: call it off the event loop). ``continue_final_message``: the text ends with
        the last message's content, left open for the model to continue (transformers cuts what follows it)."""
        request = json.dumps({"conversation": conversation, "tools": tools, "chat_template": chat_template,
                              "add_generation_prompt": add_generation_prompt,
                              "continue_final_message": continue_final_message,
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

    def _launch(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT,
                                                                         os.environ.get("PYTHONPATH")])))
        args = [json.dumps(self.tokenizer_args), str(self.memory_budget)]
        self._process = subprocess.Popen([sys.executable, "-m", __name__, str(child.fileno()), *args],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        child.close()
        self._conn = Connection(parent.detach())
        self._ready = False

    def _ensure_started(self) -> Connection:
        if self._ready and self._process is not None and self._process.poll() is not None:
            self._stop()   # died (or was killed) since the last render: replace it
        if self._process is None:
            self._launch()
        assert self._conn is not None
        if not self._ready:
            try:
                ready = self._conn.recv_bytes() if self._conn.poll(STARTUP_TIMEOUT_S) else b""
            except (EOFError, OSError):
                ready = b""
            if ready != b"R":
                self._stop()
                reason = f": {ready[1:].decode(errors='replace')}" if ready[:1] == b"F" else ""
                raise RuntimeError(f"the chat template renderer did not start{reason}")
            self._ready = True
        return self._conn

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(5.0)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None
        self._ready = False


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), json.loads(sys.argv[2]), int(sys.argv[3]))
