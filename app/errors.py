"""Domain errors, and the one place that renders every failure as ``{"error": {"type", "detail", ...}}``.

Routes raise an ``ApiError`` subclass; ``install_error_handlers`` renders those, request validation
errors and the framework's own HTTP errors (404 unknown route, 405). Whatever else escapes a route is
handled by ``app.middleware.ErrorsAsJSON``: a dependency failure (``unavailable_for``) becomes 503 with
``Retry-After``, anything else a 500, on a connection that stays open.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 asks a client to wait before trying again (seconds)


class ApiError(Exception):
    status = 400
    type = "BadRequest"
    headers: ClassVar[Mapping[str, str] | None] = None

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "detail": self.detail, **self.extra}}


class MalformedJSON(ApiError):
    status, type = 400, "MalformedJSON"


class InvalidInput(ApiError):
    """The request is well-formed JSON but breaks a rule (a sample's field, a limit). Its wire ``type`` is
    ``"ValidationError"``, as the contract names it; the class is named apart from pydantic's."""

    status, type = 422, "ValidationError"


class Unauthorized(ApiError):
    status, type = 401, "Unauthorized"
    headers: ClassVar[Mapping[str, str] | None] = {"WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    status, type = 403, "Forbidden"


class NotFound(ApiError):
    status, type = 404, "NotFound"


class RequestTimeout(ApiError):
    """The request body stopped arriving. RFC 9110 §15.5.9: the server SHOULD close the connection."""

    status, type = 408, "RequestTimeout"
    headers: ClassVar[Mapping[str, str] | None] = {"Connection": "close"}


class PayloadTooLarge(ApiError):
    status, type = 413, "PayloadTooLarge"


class UnsupportedMediaType(ApiError):
    status, type = 415, "UnsupportedMediaType"


class Unavailable(ApiError):
    status, type = 503, "Unavailable"
    headers: ClassVar[Mapping[str, str] | None] = {"Retry-After": str(RETRY_AFTER_S)}


# the error ``type`` of a bare status code, for errors that reach us as one (the framework's own)
STATUS_TYPES = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    408: "RequestTimeout", 413: "PayloadTooLarge", 415: "UnsupportedMediaType",
    416: "RangeNotSatisfiable", 422: "ValidationError", 429: "TooManyRequests", 500: "InternalError",
    503: "Unavailable",
}  # fmt: skip


def error_body(status: int, detail: str = "") -> dict[str, Any]:
    """The contract's error object for a bare status code; ``detail`` defaults to the reason phrase."""
    if not detail:
        try:
            detail = HTTPStatus(status).phrase
        except ValueError:
            detail = f"HTTP {status}"
    return {"error": {"type": STATUS_TYPES.get(status, "HTTPError"), "detail": detail}}


def unavailable_for(exc: BaseException) -> Unavailable | None:
    """The 503 that a dependency failure becomes, or None when ``exc`` is not one (a bug: 500).

    Dependency failures: any Redis error (connection refused or reset, timeout, a server still loading);
    from SQLAlchemy, an ``OperationalError`` (PEP 249: "related to the database's operation and not
    necessarily under the control of the programmer": a refused or lost connection, a statement timeout,
    a locked SQLite file), an error that invalidated its connection, or a pool checkout timeout; and the
    standard library's ``TimeoutError`` and ``ConnectionError``.
    """
    import redis
    from sqlalchemy import exc as sa

    from store.keys import ShardsMismatch
    from store.redis_client import cluster_unreachable

    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, ShardsMismatch):  # a deployment's processes disagree: until an operator fixes it
        return Unavailable(f"this API cannot use the sample buffer: {exc}")
    if isinstance(exc, redis.RedisError) or cluster_unreachable(exc):  # a Redis Cluster: store.redis_client
        return Unavailable(f"the sample buffer (Redis) is unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, sa.OperationalError | sa.TimeoutError) or (
        isinstance(exc, sa.DBAPIError) and exc.connection_invalidated
    ):
        cause = type(getattr(exc, "orig", None) or exc).__name__
        return Unavailable(f"the metadata database is unavailable ({cause}); see the server log")
    if isinstance(exc, TimeoutError | ConnectionError):
        return Unavailable(f"a dependency did not answer: {type(exc).__name__}")
    return None


def render_exception(exc: BaseException) -> JSONResponse:
    """The JSON answer for an exception that escaped a route: 503 for a dependency failure, else 500."""
    unavailable = unavailable_for(exc)
    if unavailable is not None:
        log.warning("%s (%s: %s)", unavailable.detail, type(exc).__name__, exc)
        return _render(unavailable.status, unavailable.body(), unavailable.headers)
    log.error("unhandled error", exc_info=exc)
    return _render(500, error_body(500, "internal error; see the server log"))


def _render(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Render domain errors, request validation errors and Starlette's HTTP errors in the JSON shape.

    These handlers run in Starlette's ``ExceptionMiddleware``, which answers and does not re-raise, so the
    connection stays usable; there is deliberately no handler for ``Exception`` (Starlette runs that one
    in ``ServerErrorMiddleware``, which re-raises, and the server then closes the connection).
    """

    @app.exception_handler(ApiError)
    async def _domain(_: Request, exc: ApiError) -> JSONResponse:
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
        return _render(exc.status_code, error_body(exc.status_code, str(exc.detail)), exc.headers)
