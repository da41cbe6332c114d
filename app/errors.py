"""Domain errors and the one handler that renders them as ``{"error": {"type", "detail", ...}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class DatadietError(Exception):
    status = 400
    type = "BadRequest"
    headers: ClassVar[Mapping[str, str] | None] = None

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "detail": self.detail, **self.extra}}


class BadRequest(DatadietError):
    status, type = 400, "BadRequest"


class MalformedJSON(DatadietError):
    status, type = 400, "MalformedJSON"


class ValidationError(DatadietError):
    status, type = 422, "ValidationError"


class Unauthorized(DatadietError):
    status, type = 401, "Unauthorized"
    headers: ClassVar[Mapping[str, str] | None] = {"WWW-Authenticate": "Bearer"}


class Forbidden(DatadietError):
    status, type = 403, "Forbidden"


class NotFound(DatadietError):
    status, type = 404, "NotFound"


class PayloadTooLarge(DatadietError):
    status, type = 413, "PayloadTooLarge"


class Unavailable(DatadietError):
    status, type = 503, "Unavailable"
    headers: ClassVar[Mapping[str, str] | None] = {"Retry-After": "1"}


def _render(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DatadietError)
    async def _domain(_: Request, exc: DatadietError) -> JSONResponse:
        return _render(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return _render(422, {"error": {"type": "ValidationError", "detail": detail, "errors": errors}})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return _render(exc.status_code, {"error": {"type": kind, "detail": str(exc.detail)}}, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        import redis

        if isinstance(exc, redis.RedisError):
            log.warning("redis unavailable: %s", exc)
            return _render(
                503, Unavailable(f"the sample buffer is unavailable: {exc}").body(), Unavailable.headers
            )
        log.exception("unhandled error")
        return _render(
            500, {"error": {"type": "InternalError", "detail": "internal error; see the server log"}}
        )
