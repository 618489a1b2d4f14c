"""OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, for every failure path."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmserve.errors import InvalidRequestError

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 431: "invalid_request_error",
          500: "server_error", 503: "server_error", 504: "server_error"}


class APIError(Exception):
    """Raised by handlers; rendered as OpenAI's error object with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried (``str``, ``constrained-str``, ``list[int]``,
    ``list[TextContentPart]``) in an error's location; that is not a field of the request."""
    if not isinstance(part, str):
        return False
    return ("[" in part or part in {"str", "int", "float", "bool", "dict", "list", "none"} or part[:1].isupper()
            or part.startswith(("function-", "json-or-python", "lax-", "strict-", "constrained-")))


def _is_type_error(error: dict) -> bool:
    """The input has the wrong type (``int_type``, ``list_type``, ``int_parsing``...), not a bad value."""
    kind = str(error.get("type", ""))
    return kind.endswith(("_type", "_parsing"))


def _path(loc: tuple) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _field_loc(error: dict) -> tuple:
    loc = tuple(error.get("loc", ()))
    return loc[1:] if loc[:1] == ("body",) else loc


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as ``(message, param)``: the message says where (``messages[0].role: ...``),
    ``param`` is the request field it is in. Never echoes the input, which may be huge or private."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = _field_loc(first)
    if not loc:   # the body as a whole: empty, not an object, or not sent as JSON
        if first.get("type") == "missing":
            return "the request body is empty; send a JSON object", None
        return "the request body must be a JSON object (sent with Content-Type: application/json)", None
    tag_at = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    message = "field required" if first.get("type") == "missing" else str(first.get("msg", "invalid value"))
    if tag_at is not None:
        # One error per member of the union: report the member that got furthest (the shape the client
        # evidently meant; among equals, the one whose errors are all about values, not types), or, if
        # none did, the shapes accepted.
        prefix = loc[:tag_at]
        members = [(m, e) for e in errors if (m := _field_loc(e))[:tag_at] == prefix and len(m) > tag_at]
        reach: dict[str, int] = {}   # how deep each member's errors go
        for m, _ in members:
            reach[str(m[tag_at])] = max(reach.get(str(m[tag_at]), 0), len(m))
        best = max(reach.values(), default=0)
        leaders = [tag for tag, d in reach.items() if d == best]
        right_shape = [tag for tag in leaders
                       if not any(_is_type_error(e) for m, e in members if str(m[tag_at]) == tag)]
        chosen = right_shape[0] if len(right_shape) == 1 else (
            leaders[0] if len(leaders) == 1 and best > tag_at + 1 else None)
        if chosen is not None:
            m, e = next((m, e) for m, e in members if str(m[tag_at]) == chosen and len(m) == best)
            loc = tuple(part for part in m if not _is_union_tag(part))
            message = "field required" if e.get("type") == "missing" else str(e.get("msg", "invalid value"))
        else:
            loc = prefix
            message = "expected one of: " + ", ".join(tag.replace("constrained-", "") for tag in reach)
    return f"{_path(loc)}: {message}", str(loc[0]) if loc else None


def install_error_handlers(app) -> None:  # noqa: ANN001 - FastAPI app
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal server error ({type(exc).__name__})")
