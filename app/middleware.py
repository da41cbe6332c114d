"""Pure ASGI middleware: HEAD for every GET, request metrics, and every error in the contract's JSON shape.

Pure ASGI (not ``BaseHTTPMiddleware``), so streamed responses pass through untouched. Order, outermost
first: ``HeadAsGet`` -> ``RequestMetrics`` -> ``ErrorsAsJSON`` -> the app's own exception handlers -> the
routes. ``RequestMetrics`` sits inside ``HeadAsGet`` so that it sees the scope the router fills in (the
matched route), and outside ``ErrorsAsJSON`` so that it counts the status a client really got.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_body, render_exception

HEAD_KEY = "datadiet.head"  # set in the scope of a HEAD request that the routes see as a GET


def is_head(request: Request) -> bool:
    """True when this GET is really a HEAD: a route may then skip producing the body (a large file)."""
    return bool(request.scope.get(HEAD_KEY))


class HeadAsGet:
    """RFC 9110 §9.3.2: HEAD is GET without content, with the same header fields.

    FastAPI routes answer only the methods they declare, so a HEAD request is run as the GET it mirrors
    (the scope says ``GET``; ``is_head(request)`` tells the truth) and the body is dropped on the way out,
    while the status and every header, ``Content-Length`` included, go out as they came.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.pathsend":
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            elif message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET", HEAD_KEY: True}, receive, headers_only)


class HttpMetrics:
    """The API's request metrics, in a registry of the app's own (several apps in one process, as in the
    tests, do not collide in prometheus_client's global registry)."""

    METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "datadiet_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "datadiet_http_request_duration_seconds",
            "Time from a request's arrival to the last byte of its answer, by route template, method and "
            "status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        # labels stay few: the route's template (never the raw path), "unmatched" for a path no route has,
        # and "other" for a method no route could answer
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = "HEAD" if scope.get(HEAD_KEY) else scope["method"]
        method = method if method in self.METHODS else "other"
        key = (route, method, status)
        if (children := self._children.get(key)) is None:  # labels() takes a lock: look each up once
            children = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.duration.labels(route, method, str(status)),
            )
        children[0].inc()
        children[1].observe(seconds)


class RequestMetrics:
    """Counts every HTTP request and times it (``HttpMetrics``): one clock read and two label look-ups
    per request; the body passes through untouched."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        except Exception:
            status = status or 500  # the server answers 500 when nothing was started
            raise
        finally:  # a request cancelled before its answer started (the client left) is not counted
            if status is not None:
                self.metrics.observe(scope, status, time.perf_counter() - start)


class ErrorsAsJSON:
    """Every error answer is ``{"error": {"type", "detail"}}``, and no error closes the connection.

    - An exception that escapes the app before its response has started is answered here (503 with
      ``Retry-After`` for a dependency failure, 500 otherwise; ``app.errors.render_exception``) and not
      re-raised: Starlette's ``ServerErrorMiddleware`` re-raises after answering, and uvicorn then closes
      the keep-alive connection. Once a response is under way there is nothing left to say, and the
      exception goes on (the server cuts the truncated response).
    - An error response (status >= 400) that is not JSON, such as Starlette's plain-text 400 for a
      malformed ``Range`` or its 416, is rewritten in the JSON shape; status and headers are kept.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False  # whether a response start has gone out to the server
        held: Message | None = None  # the start of a non-JSON error, sent once its body is read
        text = bytearray()

        async def rewrite(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                if message["status"] >= 400 and not content_type.startswith("application/json"):
                    held = message
                    return
                started = True
            elif held is not None and message["type"] == "http.response.body":
                text.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                started = True
                await _send_json_error(send, held, text.decode("utf-8", "replace").strip())
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception as exc:
            if started:
                raise
            await render_exception(exc)(scope, receive, send)


async def _send_json_error(send: Send, start: Message, detail: str) -> None:
    status: int = start["status"]
    body = orjson.dumps(error_body(status, detail[:1000]))
    headers = MutableHeaders(raw=list(start.get("headers", [])))
    headers["content-type"] = "application/json"
    headers["content-length"] = str(len(body))
    message: dict[str, Any] = {**start, "headers": headers.raw}
    await send(message)
    await send({"type": "http.response.body", "body": body, "more_body": False})
