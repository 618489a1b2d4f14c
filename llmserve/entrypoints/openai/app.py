"""The OpenAI-compatible HTTP application (FastAPI + uvicorn) and its lifecycle.

The HTTP port opens at once; the model loads in the background, and /health answers 503 until it is
ready (and again if the engine dies, after which the process exits non-zero so a supervisor restarts
it). SIGTERM stops accepting requests, lets running ones finish within --shutdown-timeout, exits 0.
The entry point (:mod:`llmserve.entrypoints.openai.api_server`) parses the flags and starts the engine
core before importing this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import generate_latest

import llmserve
from llmserve.config import EngineConfig
from llmserve.engine.async_engine import AsyncLLMEngine, ShutdownError
from llmserve.engine.core_client import EngineCoreClient, EngineCoreDiedError
from llmserve.entrypoints.openai.dashboard import dashboard_page, dashboard_stats
from llmserve.entrypoints.openai.embedding_protocol import EmbeddingRequest
from llmserve.entrypoints.openai.errors import APIError, error_response, install_error_handlers
from llmserve.entrypoints.openai.http_protocol import http_protocol
from llmserve.entrypoints.openai.middleware import RequestId, RequestLimits, RequireApiKey
from llmserve.entrypoints.openai.openapi import (PrometheusText, install_openapi, json_ok, json_or_events_ok,
                                                 named_events_ok, route, text_ok)
from llmserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                  TokenizeRequest)
from llmserve.entrypoints.openai.response_models import (ChatCompletionChunk, ChatCompletionResponse, CompletionChunk,
                                                   CompletionResponse, DetokenizeResponse, ModelList,
                                                   EmbeddingResponse, ResponseObject, ResponseStreamEvent,
                                                   TokenizeResponse, VersionResponse)
from llmserve.entrypoints.openai.responses_protocol import ResponsesRequest
from llmserve.entrypoints.openai.server_args import ServerConfig
from llmserve.entrypoints.openai.serving_base import ServerLimits
from llmserve.entrypoints.openai.serving_chat import OpenAIServingChat
from llmserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from llmserve.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from llmserve.entrypoints.openai.serving_models import (LoadLoRAAdapterRequest, OpenAIServingModels,
                                                        UnloadLoRAAdapterRequest)
from llmserve.entrypoints.openai.serving_responses import OpenAIServingResponses
from llmserve.entrypoints.openai.tool_parsers import TOOL_CALL_PARSERS
from llmserve.gc_heap import freeze_startup_heap
from llmserve.logging_setup import log_start_failure
from llmserve.metrics.prometheus import EngineMetrics

logger = logging.getLogger("llmserve.api")


class ServerState:
    """What the routes need; filled in once the engine has loaded."""

    def __init__(self, config: ServerConfig, engine_config: EngineConfig, core: EngineCoreClient | None = None
                 ) -> None:
        """``core``: the engine-core process, already started on ``engine_config`` (else ``load`` starts it)."""
        self.config = config
        self.engine_config = engine_config
        self.core = core
        self.engine: AsyncLLMEngine | None = None
        self.completions: OpenAIServingCompletion | None = None
        self.chat: OpenAIServingChat | None = None
        self.responses: OpenAIServingResponses | None = None
        self.embeddings: OpenAIServingEmbedding | None = None
        self.models: OpenAIServingModels | None = None
        self.metrics: EngineMetrics | None = None
        self.load_error: BaseException | None = None
        self.exit_code = 0
        self.on_fatal: Any = None   # set by run_server: stops uvicorn

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.is_running

    def load(self, loop: asyncio.AbstractEventLoop) -> None:
        """Load the model, start the engine-core process and attach to ``loop`` (runs in a background thread)."""
        try:
            names = self.config.served_model_names or [self.engine_config.model or "llmserve-demo"]
            engine_config = self.engine_config
            spec = engine_config.speculative_config
            self.metrics = EngineMetrics(names[0], num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
                                         max_loras=engine_config.max_loras if engine_config.enable_lora else None)
            metrics = self.metrics
            async_engine = AsyncLLMEngine(self.engine_config, on_step=metrics.record_step, on_dead=self._engine_died,
                                          client=self.core)
            info = async_engine.info
            models = OpenAIServingModels(names, str(info.model_path), info.max_model_len, engine_config.enable_lora,
                                         info.adapters, self.config.lora_modules)
            limits = ServerLimits(self.config.max_num_queued_reqs, self.config.request_timeout, self.config.max_n)
            self.completions = OpenAIServingCompletion(async_engine, models, limits)
            parser = self.config.tool_call_parser
            self.chat = OpenAIServingChat(async_engine, models, limits, _read_chat_template(self.config.chat_template),
                                          TOOL_CALL_PARSERS[parser] if parser else None)
            renders = self.chat.chat_template is not None or getattr(self.chat.tokenizer, "chat_template", None)
            if renders:
                self.chat.renderer.start()   # starts beside the engine core, which is loading the model
            self.responses = OpenAIServingResponses(self.chat)
            self.embeddings = OpenAIServingEmbedding(async_engine, models, limits)
            self.models = models
            async_engine.start(loop)
            if renders:
                self.chat.renderer.wait_started()
            freeze_startup_heap()   # before the first request: no collection walks the startup heap again
            self.engine = async_engine
            logger.info("ready: serving %s", ", ".join(names + list(models.lora_requests)))
        except BaseException as exc:   # noqa: BLE001
            if isinstance(exc, EngineCoreDiedError):
                logger.error("failed to load the model: %s", exc)   # the engine core has logged the detail
            else:
                log_start_failure(logger, "failed to load the model", exc)
            self.load_error = exc
            self._fatal(1)

    def begin_shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM: running requests may go on until shortly before --shutdown-timeout; then whatever is
        left is aborted, so each client gets a 503 (or an SSE error event and ``[DONE]``) instead of a
        cut connection, and the process can exit in time (the aborted streams' last events, the engine core's
        exit and the logs' flush need a moment, hence the margin)."""
        timeout = self.config.shutdown_timeout
        logger.info("shutting down: running requests get %.1f s to finish", timeout)
        if self.engine is not None:
            engine = self.engine
            loop.call_later(max(timeout - 2.0, timeout / 2), engine.abort_all,
                            ShutdownError(f"the server is shutting down and the request did not finish within "
                                          f"--shutdown-timeout ({timeout:g} s)"))

    def _engine_died(self, exc: BaseException) -> None:
        self._fatal(1)

    def _fatal(self, code: int) -> None:
        self.exit_code = code
        if self.on_fatal is not None:
            self.on_fatal()


def _read_chat_template(value: str | None) -> str | None:
    """``--chat-template`` is a file path or the Jinja template itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(value) < 4096 and path.is_file():
        return path.read_text()
    return value


def build_app(state: ServerState) -> FastAPI:
    config = state.config

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        threading.Thread(target=state.load, args=(asyncio.get_running_loop(),), name="llmserve-load",
                         daemon=True).start()
        yield
        if state.engine is not None:
            state.chat.renderer.close()
            state.engine.shutdown()

    app = FastAPI(title="llmserve", version=llmserve.__version__, lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app, api_key=config.api_key is not None, max_n=config.max_n)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(RequestLimits, max_body_bytes=config.max_request_body_bytes,
                       max_header_bytes=config.max_header_bytes)
    app.add_middleware(RequestId)
    if config.api_key is not None:
        app.add_middleware(RequireApiKey, api_key=config.api_key)   # outermost: 401 before the body is read

    async def require_ready() -> None:   # async: a plain def would run in a worker thread per request
        if not state.ready:
            raise APIError(503, "the model is not ready" if state.engine is None else "the engine is not running",
                           None, "not_ready", headers={"Retry-After": "5"})

    protected = [Depends(require_ready)]

    @app.get("/health", response_class=PlainTextResponse,
             responses=route(text_ok(PlainTextResponse, "ready (empty body)", {"type": "string", "maxLength": 0}), 503))
    async def health() -> Response:
        if not state.ready:
            return error_response(503, "not ready" if state.engine is None else "the engine is not running")
        return PlainTextResponse("")

    @app.get("/version", response_model=None, responses=route(json_ok(VersionResponse)))
    async def version() -> dict:
        return {"version": llmserve.__version__}

    @app.get("/metrics", response_class=PrometheusText,
             responses=route(text_ok(PrometheusText, "Prometheus text exposition format 0.0.4 (vLLM's metric "
                                                     "names)", {"type": "string"})))
    async def metrics() -> Response:
        return PrometheusText(generate_latest(state.metrics.registry) if state.metrics is not None else b"")

    # The dashboard is a UI over the figures /metrics exports, not part of the API: not in the OpenAPI document.
    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return dashboard_page()

    @app.get("/dashboard/stats", dependencies=protected, include_in_schema=False)
    async def dashboard_data() -> dict:
        return await dashboard_stats(state.engine, state.metrics)

    @app.get("/v1/models", dependencies=protected, response_model=None, responses=route(json_ok(ModelList), 503))
    async def models() -> dict:
        return {"object": "list", "data": state.models.model_cards()}

    if config.allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter", dependencies=protected, response_class=PlainTextResponse,
                  responses=route(text_ok(PlainTextResponse, "the adapter is loaded", {"type": "string"}), 400, 404,
                                  503))
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            await asyncio.to_thread(state.models.load_adapter, body.lora_name, body.lora_path)
            logger.info("loaded LoRA adapter %s from %s", body.lora_name, body.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", dependencies=protected, response_class=PlainTextResponse,
                  responses=route(text_ok(PlainTextResponse, "the adapter is unloaded", {"type": "string"}), 400,
                                  404, 503))
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            state.models.unload_adapter(body.lora_name, body.lora_int_id)
            logger.info("unloaded LoRA adapter %s", body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions", dependencies=protected,
              responses=route(json_or_events_ok(CompletionResponse, CompletionChunk), 400, 404, 500, 503, 504))
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await state.completions.create(body, raw, raw.state.request_id)

    @app.post("/v1/chat/completions", dependencies=protected,
              responses=route(json_or_events_ok(ChatCompletionResponse, ChatCompletionChunk), 400, 404, 500, 503, 504))
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await state.chat.create(body, raw, raw.state.request_id)

    @app.post("/v1/responses", dependencies=protected,
              responses=route(named_events_ok(ResponseObject, ResponseStreamEvent), 400, 404, 500, 503, 504))
    async def responses(body: ResponsesRequest, raw: Request) -> Response:
        return await state.responses.create(body, raw, raw.state.request_id)

    @app.post("/v1/embeddings", dependencies=protected, response_model=None,
              responses=route(json_ok(EmbeddingResponse), 400, 404, 500, 503, 504))
    async def embeddings(body: EmbeddingRequest, raw: Request) -> Response:
        return await state.embeddings.create(body, raw, raw.state.request_id)

    @app.post("/tokenize", dependencies=protected, response_model=None,
              responses=route(json_ok(TokenizeResponse), 400, 404, 503))
    async def tokenize(body: TokenizeRequest) -> dict:
        state.completions.check_model(body.model)
        engine = state.engine.info
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        for field in ("tools", "chat_template_kwargs"):
            if body.prompt is not None and getattr(body, field) is not None:
                raise APIError(400, f"{field} is for messages (a chat template renders them), not a prompt", field)
        if body.messages is not None:
            tools = [tool.as_template_tool() for tool in body.tools or []]
            tokens = await state.chat.render_prompt(body.messages, body.add_generation_prompt,
                                                    body.chat_template_kwargs, bool(body.add_special_tokens),
                                                    tools=tools, continue_final_message=body.continue_final_message)
        else:
            tokens = list(engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=protected, response_model=None,
              responses=route(json_ok(DetokenizeResponse), 400, 404, 503))
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.completions.check_model(body.model)
        engine = state.engine.info
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {engine.vocab_size})", "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    return app


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after shutting down, which makes the exit status -15; a
    graceful shutdown should exit 0, so ``run_server`` installs its own signal handlers instead."""

    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201
        yield

    def request_exit(self) -> None:
        if self.should_exit:
            self.force_exit = True   # a second signal: stop waiting for running requests
        self.should_exit = True


def serve(config: ServerConfig, engine_config: EngineConfig, core: EngineCoreClient | None) -> NoReturn:
    """Serve until SIGTERM/SIGINT or a fatal engine error, then end the process with its exit status.
    ``core``: the engine core already started on ``engine_config`` (None: it starts once the port is open)."""
    state = ServerState(config, engine_config, core)
    app = build_app(state)
    # log_config=None: uvicorn's loggers go through the root handler (--log-format), at warning level
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, http=http_protocol(config.request_read_timeout), log_config=None,
                               timeout_graceful_shutdown=config.shutdown_timeout,
                               h11_max_incomplete_event_size=config.max_header_bytes)
    server = GracefulServer(uv_config)
    loop_holder: dict[str, asyncio.AbstractEventLoop] = {}

    def stop_server() -> None:
        loop = loop_holder.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(setattr, server, "should_exit", True)

    state.on_fatal = stop_server

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        loop_holder["loop"] = loop

        def on_signal() -> None:
            if not server.should_exit:
                state.begin_shutdown(loop)
            server.request_exit()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        logger.info("listening on http://%s:%d", config.host, config.port)
        await server.serve()

    asyncio.run(serve())
    exit_now(state.exit_code)


def exit_now(code: int) -> NoReturn:
    """End the process once the server has shut down (requests answered, the engine core joined): flush the
    logs and leave without the interpreter's teardown, which frees the front end's modules and objects for a
    second or two, time that --shutdown-timeout promises to nobody."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
