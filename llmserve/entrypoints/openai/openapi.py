"""The OpenAPI document (``GET /openapi.json``) as the server behaves: each route lists every status it
answers with its body (errors as OpenAI's error object; never FastAPI's 422, since validation errors are
400s), /health and /metrics their plain-text content types, 401 and the bearer scheme on the routes behind
``--api-key``, and the bounds of the request models, with ``--max-n`` filled in.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from llmserve.entrypoints.openai.embedding_protocol import EmbeddingRequest
from llmserve.entrypoints.openai.middleware import requires_api_key
from llmserve.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                  TokenizeRequest)
from llmserve.entrypoints.openai.response_models import (ChatCompletionChunk, CompletionChunk, ErrorResponse,
                                                         ResponseStreamEvent)
from llmserve.entrypoints.openai.responses_protocol import ResponsesRequest

REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, EmbeddingRequest, ResponsesRequest,
                   TokenizeRequest, DetokenizeRequest)
# referenced by "$ref" in this module
DEFINED_HERE = (ErrorResponse, CompletionChunk, ChatCompletionChunk, ResponseStreamEvent)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"   # the text exposition format generate_latest writes
DESCRIPTION = ("An OpenAI-compatible LLM inference server. Every error is OpenAI's error object "
               "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`, `param` naming the request "
               "field at fault.")

_WHY = {
    400: "invalid request: malformed JSON, a field of the wrong type, out of range or not supported yet (`param` "
         "names it), a prompt that does not fit the context, a structured-output constraint that does not compile",
    401: "missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "unknown model (code `model_not_found`, param `model`)",
    413: "request body over --max-request-body-bytes",
    431: "request head over --max-header-bytes",
    500: "the model failed on this request (code `engine_error`); the other requests continue",
    503: "not ready (`not_ready`), overloaded (`overloaded`, --max-num-queued-reqs), engine dead (`engine_dead`) "
         "or shutting down (`shutting_down`); with Retry-After",
    504: "no result within --request-timeout (code `timeout`)",
}
_LIMITS = (413, 431)   # every route: the middleware measures the request before any route sees it


class PrometheusText(Response):
    media_type = PROMETHEUS_CONTENT_TYPE   # Starlette appends "; charset=utf-8"


def error(status: int) -> dict[str, Any]:
    """An error status: always OpenAI's error object as JSON, whatever the route's own content type."""
    return {"description": _WHY[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def route(ok: dict[str, Any], *errors: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses``: ``ok`` for 200, the error object for each status in ``errors`` and the limits."""
    return {200: ok, **{status: error(status) for status in sorted({*errors, *_LIMITS})}}


def json_ok(model: type[BaseModel], description: str = "success") -> dict[str, Any]:
    return {"model": model, "description": description}


def json_or_events_ok(model: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
    """200 as JSON, or with ``stream: true`` as server-sent events: ``data: {chunk}`` (an error after the
    stream started: ``data: {error object}``), then ``data: [DONE]``. The event schema is OpenAPI 3.1's:
    the ``schema`` of an event-stream media type describes one event."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}
    return {"model": model, "description": "the completion, or its stream of events",
            "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                         "properties": {"data": data}}}}}


def named_events_ok(model: type[BaseModel], event: type[BaseModel]) -> dict[str, Any]:
    """200 as JSON, or with ``stream: true`` as named server-sent events (``event: TYPE``, ``data: {event}``)
    and no closing ``[DONE]``, as the Responses API streams."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{event.__name__}"}}
    return {"model": model, "description": "the response, or its stream of events",
            "content": {"text/event-stream": {"schema": {"type": "object", "required": ["event", "data"],
                                                         "properties": {"event": {"type": "string"},
                                                                        "data": data}}}}}


def text_ok(response_class: type[Response], description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """200 as the route's ``response_class`` (a text/plain one) sends it."""
    return {"description": description, "content": {response_class.media_type: {"schema": schema}}}


def install_openapi(app: FastAPI, api_key: bool, max_n: int) -> None:
    """Serve the document with what FastAPI cannot know: no 422, 401 and the bearer scheme on the routes
    behind the API key, n bounded by ``max_n``. The request models' schemas are pydantic's own: FastAPI's
    OpenAPI model would write integer bounds as floats (and 2**63 - 1 as 2**63)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=DESCRIPTION,
                                   routes=app.routes)
            schemas = document["components"]["schemas"]
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            _, definitions = models_json_schema([(model, "validation") for model in REQUEST_MODELS]
                                                + [(model, "serialization") for model in DEFINED_HERE],
                                                ref_template="#/components/schemas/{model}")
            schemas.update(definitions["$defs"])
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                schemas[name]["properties"]["n"]["maximum"] = max_n
            for path, operations in document["paths"].items():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
                    if api_key and requires_api_key(path):
                        operation["responses"]["401"] = error(401)
                        operation["security"] = [{"bearer": []}]
            if api_key:
                document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi   # type: ignore[method-assign]
