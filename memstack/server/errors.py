"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, every reason listed.

FastAPI's own validation errors (422 with a `detail` list) are turned into 400s of this shape, the
message naming every field that is wrong; HTTP errors raised anywhere (404 route, 405 method,
413 body, ...) get the same shape, so an OpenAI client always finds `error.message`.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
         415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """Raised by a handler: the request fails with this status and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or TYPES.get(status, "invalid_request_error")
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type_: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_bytes(status: int, message: str, **kw) -> bytes:
    return json.dumps(error_body(status, message, **kw)).encode()


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Every validation error as `field: reason`, and the first field (OpenAI's `param`)."""
    lines, first = [], None
    for e in errors:
        where = _loc(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            where = "body"
            msg = f"invalid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})"
        else:
            msg = e.get("msg", "invalid")
        first = first or where
        lines.append(f"{where}: {msg}")
    return "; ".join(lines) or "invalid request", first


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        msg, param = validation_message(list(e.errors()))
        return JSONResponse(error_body(400, msg, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return JSONResponse(error_body(e.status_code, detail), e.status_code, headers=getattr(e, "headers", None))
