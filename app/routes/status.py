"""``/healthz``, ``/readyz``, ``GET /v1/stats`` and ``GET /metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.auth import require
from app.deps import BufferDep, EngineDep

router = APIRouter(tags=["status"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive; checks nothing else."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(*, buffer: BufferDep, engine: EngineDep) -> JSONResponse:
    """Redis and the database answer: 200, else 503 naming what is down."""
    problems: dict[str, str] = {}
    try:
        await buffer.r.ping()
    except Exception as e:  # any failure to answer means not ready
        problems["redis"] = f"{type(e).__name__}: {e}"

    def _db() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        await run_in_threadpool(_db)
    except Exception as e:
        problems["database"] = f"{type(e).__name__}: {e}"
    if problems:
        detail = "; ".join(f"{k} is unavailable ({v})" for k, v in problems.items())
        body = {"error": {"type": "Unavailable", "detail": detail, "checks": problems}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "checks": {"redis": "ok", "database": "ok"}})


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
