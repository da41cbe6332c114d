"""Request dependencies: what the lifespan opened, handed to keyword-only route handlers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.errors import MalformedJSON, PayloadTooLarge
from app.schema import InputSpec, non_finite_error
from store.buffer import SampleBuffer
from store.config import Settings

MAX_BODY_BYTES = 16 * 1024 * 1024
DRAIN_LIMIT = 64 * 1024 * 1024  # beyond this a refused upload is cut off instead of read to its end


def _buffer(request: Request) -> SampleBuffer:
    return request.app.state.buffer


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _spec(request: Request) -> InputSpec:
    return request.app.state.input_spec


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


BufferDep = Annotated[SampleBuffer, Depends(_buffer)]
SettingsDep = Annotated[Settings, Depends(_settings)]
SpecDep = Annotated[InputSpec, Depends(_spec)]
EngineDep = Annotated[Engine, Depends(_engine)]
SessionDep = Annotated[Session, Depends(_session)]


async def _drain(chunks: AsyncIterator[bytes], limit: int) -> None:
    """Read and discard the rest of a refused body (up to ``limit``) so the client can read our answer."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            break


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> object:
    """The request body parsed as JSON, refusing more than ``limit`` bytes without holding them in memory."""
    import orjson

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request.stream(), DRAIN_LIMIT)
        raise PayloadTooLarge(f"the body is {int(declared)} bytes; the limit is {limit} bytes (16 MiB)")
    body = bytearray()
    chunks = request.stream()  # one iterator: Starlette refuses a second request.stream()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            body = bytearray()
            await _drain(chunks, DRAIN_LIMIT)
            raise PayloadTooLarge(f"the body exceeds {limit} bytes (16 MiB)")
    if not body:
        raise MalformedJSON("the body is empty; expected JSON")
    try:
        return orjson.loads(body)
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
