"""Request dependencies: what the lifespan opened, handed to keyword-only route handlers, and the two
bounded ways a route touches the outside: ``read_json`` (the body) and ``run_db`` (the database)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request
from sqlalchemy.engine import Engine

from app.errors import MalformedJSON, PayloadTooLarge, RequestTimeout, Unavailable, UnsupportedMediaType
from app.schema import InputSpec, non_finite_error, wide_integer_error
from store.buffer import SampleBuffer

MAX_BODY_BYTES = 16 * 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # beyond this a refused upload is cut off instead of read to its end
T = TypeVar("T")


# async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop on every request
async def _buffer(request: Request) -> SampleBuffer:
    """The buffer, once its shard count is known to agree with this process's (one script, on the first
    request that reaches Redis after a count is recorded; ``SampleBuffer.ensure_layout``). An API with another
    ``DATADIET_BUFFER_SHARDS`` would read and write keys nobody else uses: every route that touches the
    buffer answers 503 naming the setting instead (``app.errors.unavailable_for``)."""
    buffer: SampleBuffer = request.app.state.buffer
    await buffer.ensure_layout()
    return buffer


async def _unchecked_buffer(request: Request) -> SampleBuffer:
    return request.app.state.buffer


async def _spec(request: Request) -> InputSpec:
    return request.app.state.input_spec


async def _engine(request: Request) -> Engine:
    return request.app.state.engine


BufferDep = Annotated[SampleBuffer, Depends(_buffer)]
UncheckedBufferDep = Annotated[SampleBuffer, Depends(_unchecked_buffer)]  # /readyz: it reports the check
SpecDep = Annotated[InputSpec, Depends(_spec)]
EngineDep = Annotated[Engine, Depends(_engine)]


async def run_db(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, blocking database work, in a worker thread; 503 if it takes longer than
    ``DATADIET_DATABASE_TIMEOUT`` seconds (default 1).

    ``fn`` opens and closes its own session, so no connection outlives the call (nor a streamed
    response). The engine's connect, pool and statement timeouts bound most hangs; this deadline bounds
    the rest (a partitioned server that never answers a query): the request is answered, the thread is
    abandoned and returns its connection when the socket gives up or the network heals.
    """
    timeout: float = request.app.state.settings.database_timeout
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)
    except TimeoutError:
        raise Unavailable(f"the metadata database did not answer within {timeout:g} s") from None


def json_media_type_problem(content_type: str | None) -> str | None:
    """Why ``content_type`` is not JSON we read, or None: ``application/json``, optionally with
    ``charset=utf-8`` (RFC 8259 §8.1: JSON exchanged between systems is UTF-8)."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "application/json":
        shown = repr(content_type) if content_type else "none"
        return f"the body must be sent as 'Content-Type: application/json'; got {shown}"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            charset = value.strip()
            return (
                f"JSON is UTF-8: send 'Content-Type: application/json' (charset utf-8 or none), not {charset}"
            )
    return None


async def _chunks(request: Request, idle_timeout: float) -> AsyncIterator[bytes]:
    """The body's chunks; RequestTimeout when the next one takes longer than ``idle_timeout`` seconds
    (an idle timeout between reads, like nginx's ``client_body_timeout``)."""
    stream = request.stream()  # one iterator: Starlette refuses a second request.stream()
    while True:
        try:
            with anyio.fail_after(idle_timeout):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stopped arriving: nothing for {idle_timeout:g} s "
                "(DATADIET_REQUEST_BODY_TIMEOUT)"
            ) from None
        yield chunk


async def _drain(chunks: AsyncIterator[bytes], limit: int) -> None:
    """Read and discard the rest of a refused body (up to ``limit``) so the client can read our answer."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            break


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> object:
    """The request body parsed as JSON, refusing more than ``limit`` bytes without holding them in memory.

    415 unless the body is declared ``application/json`` (so a web page cannot post here with a CORS
    "simple" request: text/plain or a form); 408 when the body stops arriving for
    ``DATADIET_REQUEST_BODY_TIMEOUT`` seconds; 413 past ``limit``; 400 when it is not JSON.
    """
    import orjson

    chunks = _chunks(request, request.app.state.settings.request_body_timeout)
    if (problem := json_media_type_problem(request.headers.get("content-type"))) is not None:
        await _drain(chunks, DRAIN_LIMIT)
        raise UnsupportedMediaType(problem)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        await _drain(chunks, DRAIN_LIMIT)
        raise PayloadTooLarge(f"the body is {int(declared)} bytes; the limit is {limit} bytes (16 MiB)")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            body = bytearray()
            await _drain(chunks, DRAIN_LIMIT)
            raise PayloadTooLarge(f"the body exceeds {limit} bytes (16 MiB)")
    if not body:
        raise MalformedJSON("the body is empty; expected JSON")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        # The contract answers NaN/Infinity/1e999 in a sample with a 422 naming the sample and field:
        # the standard library reads them (as floats), so a second, lenient parse can say where they are.
        try:
            lenient = json.loads(body)
        except (ValueError, RecursionError):
            lenient = None
        if (error := non_finite_error(lenient)) is not None:
            raise error from None
        raise MalformedJSON(f"the body is not valid JSON (NaN and Infinity are not allowed): {e}") from None
    # orjson reads an integer beyond 64 bits as a float: refuse it rather than return it rounded
    if (error := wide_integer_error(body)) is not None:
        raise error
    return value
