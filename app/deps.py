"""Request dependencies: what the lifespan opened, handed to keyword-only route handlers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.errors import MalformedJSON, PayloadTooLarge
from app.schema import InputSpec
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


async def _drain(request: Request, limit: int) -> None:
    """Read and discard the rest of a refused body (up to ``limit``) so the client can read our answer."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            break


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> object:
    """The request body parsed as JSON, refusing more than ``limit`` bytes without holding them in memory."""
    import orjson

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, DRAIN_LIMIT)
        raise PayloadTooLarge(f"the body is {int(declared)} bytes; the limit is {limit} bytes (16 MiB)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            body = bytearray()
            await _drain(request, DRAIN_LIMIT)
            raise PayloadTooLarge(f"the body exceeds {limit} bytes (16 MiB)")
    if not body:
        raise MalformedJSON("the body is empty; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise MalformedJSON(f"the body is not valid JSON (NaN and Infinity are not allowed): {e}") from None
