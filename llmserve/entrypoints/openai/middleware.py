"""The server's ASGI middlewares: request-size limits, the request id, the API key. Plain ASGI, not
FastAPI's ``@app.middleware("http")``, which would hide the client's disconnect from the routes
(``Request.is_disconnected`` never turns true behind it), so nobody would abort its request."""

from __future__ import annotations

import hmac
import uuid
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import Headers, MutableHeaders

from llmserve.entrypoints.openai.errors import error_response

DASHBOARD_PAGE = "/dashboard"


def requires_api_key(path: str) -> bool:
    """The routes that run the model or the tokenizer, and the dashboard (page and data); the probes
    (/health, /metrics, /version) stay open."""
    return (path.startswith(("/v1/", f"{DASHBOARD_PAGE}/")) or path in ("/tokenize", "/detokenize", DASHBOARD_PAGE))


class RequestLimits:
    """ASGI middleware bounding what one request may make the server hold: a request head (request line +
    headers) over ``max_header_bytes`` gets 431, a body over ``max_body_bytes`` gets 413, whether its size is
    announced by Content-Length or only found by counting a chunked body (which is read here, up to the
    limit, before the route sees it). Both answers are OpenAI error objects and close the connection."""

    def __init__(self, app: Any, max_body_bytes: int, max_header_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        head = (len(scope.get("method", "")) + len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
                + sum(len(name) + len(value) + 4 for name, value in headers))
        if head > self.max_header_bytes:
            return await _reject(scope, receive, send, 431,
                                 f"request headers larger than {self.max_header_bytes} bytes")
        length = dict(headers).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reject(scope, receive, send, 400, "invalid Content-Length header")
            if int(length) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)   # h11 never delivers more than Content-Length
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read the body now, counting, so an oversized one is refused with
        # 413 before any of it is parsed (a route reading it would turn the refusal into a parse error).
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client left before finishing its body
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()   # afterwards: http.disconnect when the client goes

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await _reject(scope, receive, send, 413, f"request body larger than {self.max_body_bytes} bytes")


class RequestId:
    """ASGI middleware: the client's X-Request-Id (or a fresh one) is ``request.state.request_id``, names the
    request in the log, and is echoed in the response's X-Request-Id header."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = Headers(scope=scope).get("x-request-id")
        request_id = incoming[:256] if incoming else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequireApiKey:
    """ASGI middleware: the model endpoints want ``Authorization: Bearer <key>``; the probes do not, nor do
    CORS preflights (browsers send those without credentials). The dashboard page also takes the key as
    ``?api_key=KEY``, since a browser opening a URL sends no header; its data wants the header, which the
    page sends."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and requires_api_key(path):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if path == DASHBOARD_PAGE and not token:
                scheme, token = "bearer", _query_value(scope, "api_key")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.expected):
                how = ("open /dashboard?api_key=<key>" if path == DASHBOARD_PAGE
                       else "send 'Authorization: Bearer <key>'")
                response = error_response(401, f"invalid or missing API key ({how})", None, "invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _query_value(scope: dict, name: str) -> str:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else ""


async def _reject(scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
    """An OpenAI error that also closes the connection (the rest of the request is never read)."""
    response = error_response(status, message, headers={"Connection": "close"})
    await response(scope, receive, send)
