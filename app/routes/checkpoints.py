"""Published model checkpoints: metadata from SQL, files streamed from disk.

Downloads carry a strong ``ETag`` (the quoted sha256), answer ``If-None-Match`` with 304 and single
``Range`` requests with 206; ``X-Checkpoint-Version`` names the version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select

from app.auth import require
from app.deps import SessionDep
from app.errors import NotFound, ValidationError
from store.meta import Checkpoint, latest_checkpoint

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], dependencies=[require("read")])


def _find(session: SessionDep, version: str) -> Checkpoint:
    if version == "latest":
        ckpt = latest_checkpoint(session)
        if ckpt is None:
            raise NotFound("no checkpoint has been published yet")
        return ckpt
    if not version.isdigit():
        raise ValidationError(f"a checkpoint version is a positive integer or 'latest', got {version!r}")
    ckpt = session.get(Checkpoint, int(version))
    if ckpt is None:
        raise NotFound(f"no checkpoint version {version}")
    return ckpt


@router.get("")
def list_checkpoints(*, session: SessionDep, limit: int = 100) -> list[dict[str, Any]]:
    """Published checkpoints, newest first."""
    rows = session.scalars(select(Checkpoint).order_by(Checkpoint.version.desc()).limit(limit))
    return [c.summary() for c in rows]


@router.get("/{version}")
def get_checkpoint(*, version: str, session: SessionDep) -> dict[str, Any]:
    """One checkpoint's metadata (``latest`` or a version number), with its model kind and config."""
    return _find(session, version).detail()


@router.get("/{version}/file", response_model=None)
def download_checkpoint(*, version: str, request: Request, session: SessionDep) -> Response:
    """The safetensors bytes, streamed; cache with ``If-None-Match``, resume with ``Range``."""
    ckpt = _find(session, version)
    etag = f'"{ckpt.sha256}"'
    headers = {"ETag": etag, "X-Checkpoint-Version": str(ckpt.version), "Cache-Control": "no-cache"}
    inm = request.headers.get("if-none-match")
    # weak comparison, as RFC 9110 asks of If-None-Match: W/"x" matches "x"
    if inm is not None and (
        inm.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in inm.split(",")]
    ):
        return Response(status_code=304, headers=headers)
    path = Path(ckpt.path)
    if not path.is_file():
        raise NotFound(f"checkpoint {ckpt.version}'s file is missing on this server")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers=headers,
        filename=f"datadiet-v{ckpt.version}.safetensors",
    )
