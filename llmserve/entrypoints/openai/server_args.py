"""The API server's own flags (the engine's are in :mod:`llmserve.entrypoints.cli_args`) and the
:class:`ServerConfig` they make. Light to import (no HTTP stack): the server's entry point parses them
before it starts the engine core."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

from llmserve.config import parse_size
from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
DEFAULT_MAX_HEADER_BYTES = 16 * 2**10
API_KEY_ENV = "LLMSERVE_API_KEY"   # --api-key's default (as vLLM's VLLM_API_KEY): keeps the key off the command line
RUNTIME_LORA_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModulePath:
    """One ``--lora-modules`` item: ``name=path`` or ``{"name": .., "path": .., "base_model_name": ..}``."""
    if value.lstrip().startswith("{"):
        try:
            item = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"--lora-modules: {value!r} is not valid JSON: {exc}") from None
        unknown = sorted(set(item) - {"name", "path", "base_model_name"})
        if unknown or not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str):
            raise ValueError(f"--lora-modules: {value!r} must be a JSON object with string 'name' and 'path' (and "
                             "optionally 'base_model_name')" + (f"; unknown keys: {', '.join(unknown)}" if unknown
                                                                 else ""))
        return LoRAModulePath(item["name"], item["path"], item.get("base_model_name"))
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules: {value!r} must be name=path or a JSON object")
    return LoRAModulePath(name, path)


def runtime_lora_updating_allowed(flag: bool) -> bool:
    return flag or os.environ.get(RUNTIME_LORA_UPDATING_ENV, "").strip().lower() in ("1", "true")


def add_lora_server_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH|JSON",
                       help='LoRA adapters served by name (needs --enable-lora): name=path or '
                            '\'{"name": "sql", "path": "/adapters/sql", "base_model_name": "base"}\'')
    group.add_argument("--allow-runtime-lora-updating", action="store_true",
                       help=f"enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also "
                            f"{RUNTIME_LORA_UPDATING_ENV}=True)")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    chat_template: str | None = None
    max_num_queued_reqs: int | None = None
    request_timeout: float | None = None
    allowed_origins: list[str] = field(default_factory=list)
    shutdown_timeout: float = 30.0
    request_read_timeout: float | None = 60.0
    max_n: int = 128
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    tool_call_parser: str | None = None   # set only with --enable-auto-tool-choice
    lora_modules: list[LoRAModulePath] = field(default_factory=list)
    allow_runtime_lora_updating: bool = False



def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the MODEL argument)")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on model endpoints (default: ${API_KEY_ENV} if set)")
    g.add_argument("--chat-template", default=None, help="Jinja chat template, inline or a file path")
    g.add_argument("--max-num-queued-reqs", type=int, default=None,
                   help="answer 503 (Retry-After) when this many requests are already waiting")
    g.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may run before it is aborted (504, or an SSE error event)")
    g.add_argument("--request-read-timeout", type=float, default=60.0,
                   help="seconds a client gets to send a whole request, head and body (408 after)")
    g.add_argument("--allowed-origins", nargs="*", default=[], help="CORS origins allowed (default: none)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish")
    g.add_argument("--max-n", type=int, default=128, help="largest n / best_of accepted")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide when to call tools (tool_choice auto); needs --tool-call-parser")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_CALL_PARSERS),
                   help="how the model writes tool calls: hermes (Qwen, Hermes), llama3_json (Llama 3.x), "
                        "mistral, pythonic (Llama 3.2/4, Gemma 3 with a pythonic template)")
    g.add_argument("--max-request-body-bytes", default=str(DEFAULT_MAX_BODY_BYTES),
                   help="larger request bodies get 413 (bytes or a size such as 32MiB)")
    g.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                   help="largest request head (request line + headers) accepted")
    add_lora_server_args(g)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for name in ("max_num_queued_reqs", "max_n", "max_header_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    body = parse_size(args.max_request_body_bytes)
    if body < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {args.max_request_body_bytes}")
    for name in ("request_timeout", "request_read_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together: the parser reads the calls "
                         "a model makes on its own (tool_choice auto); required and named choices need neither")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    return ServerConfig(host=args.host, port=args.port, served_model_names=args.served_model_name or [],
                        api_key=api_key, chat_template=args.chat_template,
                        max_num_queued_reqs=args.max_num_queued_reqs, request_timeout=args.request_timeout,
                        request_read_timeout=args.request_read_timeout,
                        allowed_origins=args.allowed_origins, shutdown_timeout=args.shutdown_timeout,
                        max_n=args.max_n, max_request_body_bytes=body,
                        max_header_bytes=args.max_header_bytes, tool_call_parser=args.tool_call_parser,
                        lora_modules=[parse_lora_module(m) for m in args.lora_modules],
                        allow_runtime_lora_updating=runtime_lora_updating_allowed(args.allow_runtime_lora_updating))
