"""Published model checkpoints: metadata from SQL, files streamed from disk.

Downloads carry a strong ``ETag`` (the quoted sha256), answer ``If-None-Match`` with 304 (RFC 9110
§13.1.2) and single ``Range`` requests with 206 (§14); a ``Range`` in a unit other than bytes is ignored
(§14.2: 200 with the whole file). ``HEAD`` answers with the same headers and no body (§9.3.2).
``X-Checkpoint-Version`` names the version.

Every database read runs in ``run_db``: a session of its own, closed before the answer (and before a
file starts streaming), within ``DATADIET_DATABASE_TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from app.auth import require
from app.conditional import not_modified
from app.deps import run_db
from app.errors import NotFound
from app.middleware import is_head
from app.responses import CHECKPOINT_FILE_RESPONSES, CheckpointDetail, CheckpointSummary
from store.buffer import SampleBuffer
from store.meta import Checkpoint, latest_checkpoint

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], dependencies=[require("read")])

MAX_LIST = 1000
MAX_VERSION = 2**31 - 1  # versions are a 32-bit SQL INTEGER
Version = Annotated[
    str,
    PathParam(
        pattern=r"^(latest|[1-9][0-9]{0,9})$",
        description="'latest', or a version number (1 up to 2^31 - 1)",
        examples=["latest", "3"],
    ),
]


def _find(engine: Engine, version: str) -> Checkpoint:
    """The checkpoint row (detached from its closed session), or NotFound."""
    if version != "latest" and int(version) > MAX_VERSION:
        raise NotFound(f"no checkpoint version {version}")
    with Session(engine) as session:
        ckpt = latest_checkpoint(session) if version == "latest" else session.get(Checkpoint, int(version))
    if ckpt is None:
        raise NotFound(
            "no checkpoint has been published yet"
            if version == "latest"
            else f"no checkpoint version {version}"
        )
    return ckpt


def _list(engine: Engine, limit: int) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.scalars(select(Checkpoint).order_by(Checkpoint.version.desc()).limit(limit))
        return [c.summary() for c in rows]


@router.get("", response_model=list[CheckpointSummary])
async def list_checkpoints(
    *,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST, description="at most this many")] = 100,
) -> list[dict[str, Any]]:
    """Published checkpoints, newest first."""
    return await run_db(request, _list, request.app.state.engine, limit)


@router.get("/{version}", response_model=CheckpointDetail)
async def get_checkpoint(*, version: Version, request: Request) -> dict[str, Any]:
    """One checkpoint's metadata (``latest`` or a version number), with its model kind and config."""
    return (await run_db(request, _find, request.app.state.engine, version)).detail()


IN_USE_WHILE_STREAMING_S = 3600.0  # a download marks its checkpoint in use for at most this long ...
IN_USE_AFTER_S = 600.0  # ... and for this long after it ends, so a Range resume still finds the file


class _CheckpointFile(FileResponse):
    """A ``FileResponse`` that ignores a ``Range`` whose unit is not ``bytes``: RFC 9110 §14.2, "An origin
    server MUST ignore a Range header field that contains a range unit it does not understand". While it
    streams (and IN_USE_AFTER_S after), its checkpoint is marked in use: retention keeps the file.
    Read in 1 MiB chunks (Starlette's default, 64 KiB, costs a worker-thread hop per 64 KiB)."""

    chunk_size = 1024 * 1024

    def __init__(self, *args: Any, buffer: SampleBuffer, version: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer, self.version = buffer, version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers", [])
        if any(name == b"range" and not _is_bytes_range(value) for name, value in headers):
            scope = {**scope, "headers": [(n, v) for n, v in headers if n != b"range"]}
        with contextlib.suppress(RedisError):  # best effort: the download itself needs no Redis
            await self.buffer.mark_download(self.version, time.time() + IN_USE_WHILE_STREAMING_S)
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(RedisError):
                await self.buffer.mark_download(self.version, time.time() + IN_USE_AFTER_S)


def _is_bytes_range(value: bytes) -> bool:
    unit, sep, _ = value.partition(b"=")
    return bool(sep) and unit.strip().lower() == b"bytes"


ROWS_CACHED = 64  # checkpoint rows by version kept in each process: a version's row never changes


async def _file_row(request: Request, version: str) -> Checkpoint:
    """The row of a checkpoint to download: a numbered version from this process's cache once read (its
    file is checked on every use: retention deletes the row, then the file), ``latest`` from the database
    each time. Saves a database round trip (a worker thread) on every poll of a pinned version."""
    cache: dict[str, Checkpoint] = request.app.state.checkpoint_rows
    row = cache.get(version)
    if row is not None and os.path.exists(row.path):
        return row
    row = await run_db(request, _find, request.app.state.engine, version)
    if version != "latest":
        if len(cache) >= ROWS_CACHED:
            cache.pop(next(iter(cache)))  # the oldest read
        cache[version] = row
    return row


@router.get(
    "/{version}/file", response_model=None, response_class=Response, responses=CHECKPOINT_FILE_RESPONSES
)
async def download_checkpoint(*, version: Version, request: Request) -> Response:
    """The safetensors bytes, streamed; cache with ``If-None-Match``, resume with ``Range``."""
    ckpt = await _file_row(request, version)
    etag = f'"{ckpt.sha256}"'
    headers = {"ETag": etag, "X-Checkpoint-Version": str(ckpt.version), "Cache-Control": "no-cache"}
    if not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    path = Path(ckpt.path)
    try:
        stat = os.stat(path)
    except OSError:
        stat = None
    if stat is None or not path.is_file():
        raise NotFound(f"checkpoint {ckpt.version}'s file is missing on this server")
    response = _CheckpointFile(
        path,
        stat_result=stat,
        media_type="application/octet-stream",
        headers=headers,
        filename=f"datadiet-v{ckpt.version}.safetensors",
        buffer=request.app.state.buffer,
        version=ckpt.version,
    )
    if is_head(request):  # the same headers (Content-Length, ETag, ...), without reading the file
        return Response(status_code=200, headers=dict(response.headers))
    return response
