"""Every error the server answers, as ``{"error": {"message", "type"}}``: 4xx for bad
input, 503 when busy; the handlers FastAPI calls for them."""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["ApiError", "error_body", "install_handlers"]

logger = logging.getLogger("m3_rag.server")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request_error",
    503: "server_busy",
}


class ApiError(Exception):
    """An error answered with ``status`` and ``message`` (and extra headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_body(status: int, message: str) -> bytes:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return json.dumps({"error": {"message": message, "type": kind}}).encode("utf-8")


def _branch(part: object) -> bool:
    """A location part naming a union member or a validator (``str``, ``list[str]``,
    ``function-after[...]``), not a field."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "none") or "[" in part
    )


def _validation_message(errors: list[Any]) -> tuple[int, str]:
    """One line from pydantic's errors: the first three, each with its location."""
    parts = []
    status = 422
    for err in errors[:3]:
        if err.get("type") == "json_invalid":
            status = 400
            ctx = err.get("ctx") or {}
            parts.append(f"the body is not valid JSON: {ctx.get('error', err.get('msg'))}")
            continue
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not _branch(x))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        part = f"{loc or 'body'}: {msg}"
        if part not in parts:
            parts.append(part)
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    return status, "; ".join(parts) or "invalid request"


def install_handlers(app: Any) -> None:
    """Map ApiError, validation errors, HTTP errors and bad values to JSON errors."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    def respond(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return Response(
            error_body(status, message),
            status_code=status,
            media_type="application/json",
            headers=headers,
        )

    async def api_error(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return respond(exc.status, exc.message, exc.headers)

    async def validation(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        status, message = _validation_message(list(exc.errors()))
        return respond(status, message)

    async def http_error(request: Any, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the body is not valid UTF-8 JSON"
        return respond(exc.status_code, message, dict(exc.headers or {}))

    async def unexpected(request: Any, exc: Exception) -> Response:
        # a bug, not bad input (every bad input is a 4xx above): JSON still, and logged
        logger.error("unexpected error", exc_info=exc)
        return respond(500, f"internal error ({type(exc).__name__}); see the server's log")

    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
