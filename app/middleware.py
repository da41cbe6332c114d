"""Pure ASGI middleware: HEAD for every GET, and every error in the contract's JSON shape.

Pure ASGI (not ``BaseHTTPMiddleware``), so streamed responses pass through untouched. Order, outermost
first: ``HeadAsGet`` -> ``ErrorsAsJSON`` -> the app's own exception handlers -> the routes.
"""

from __future__ import annotations

from typing import Any

import orjson
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
