"""``/healthz``, ``/readyz``, ``GET /v1/stats`` and ``GET /metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text
from sqlalchemy.engine import Engine

from app.auth import require
from app.deps import BufferDep, EngineDep, run_db
from app.errors import RETRY_AFTER_S
from store.config import Settings

router = APIRouter(tags=["status"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive; checks nothing else."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(*, request: Request, buffer: BufferDep, engine: EngineDep) -> JSONResponse:
    """Redis and the database answer: 200, else 503 naming what is down.

    Both are asked at once, each within its timeout (``DATADIET_REDIS_TIMEOUT``,
    ``DATADIET_DATABASE_TIMEOUT``; 1 s by default), so a hung dependency is reported in about a second.
    """
    settings: Settings = request.app.state.settings

    async def redis_check() -> None:
        try:
            with anyio.fail_after(settings.redis_timeout):
                await buffer.r.ping()
        except TimeoutError:
            raise TimeoutError(f"no answer within {settings.redis_timeout:g} s") from None

    def select_1(engine: Engine) -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    results = await asyncio.gather(redis_check(), run_db(request, select_1, engine), return_exceptions=True)
    problems = {
        name: _describe(e)
        for name, e in zip(("redis", "database"), results, strict=True)
        if isinstance(e, BaseException)
    }
    if problems:
        detail = "; ".join(f"{k} is unavailable ({v})" for k, v in problems.items())
        body = {"error": {"type": "Unavailable", "detail": detail, "checks": problems}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse({"status": "ready", "checks": {"redis": "ok", "database": "ok"}})


def _describe(e: BaseException) -> str:
    """``Type: first line of the message`` (SQLAlchemy's messages go on with the SQL and a link)."""
    lines = str(getattr(e, "detail", e)).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


@router.get("/v1/stats", dependencies=[require("read")])
async def stats(*, buffer: BufferDep) -> dict[str, Any]:
    """Buffer size and counters, the validation set, and the trainer's progress."""
    return await buffer.stats()


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[require("read")])
async def metrics(*, buffer: BufferDep) -> PlainTextResponse:
    """Prometheus text format."""
    s = await buffer.stats()
    b, t = s["buffer"], s["trainer"]
    lines = [
        "# TYPE datadiet_buffer_samples gauge",
        f"datadiet_buffer_samples {b['size']}",
        "# TYPE datadiet_buffer_capacity gauge",
        f"datadiet_buffer_capacity {b['capacity']}",
    ]
    for name in ("ingested", "duplicates", "evicted"):
        lines += [f"# TYPE datadiet_samples_{name}_total counter", f"datadiet_samples_{name}_total {b[name]}"]
    lines += [
        "# TYPE datadiet_validation_version gauge",
        f"datadiet_validation_version {s['validation']['version']}",
    ]
    if t["step"] is not None:
        lines += ["# TYPE datadiet_trainer_step gauge", f"datadiet_trainer_step {t['step']}"]
    if t["val_loss"] is not None:
        lines += ["# TYPE datadiet_trainer_val_loss gauge", f"datadiet_trainer_val_loss {t['val_loss']}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
