"""``GET /v1/weights/history``: the weight history, from the SQL weight snapshots (``store.meta``).

The trainer records a ``WeightSnapshot`` of its published weights document (source weights and the
per-sample weight summary) with every checkpoint it registers (``trainer/publish.py``), and retention
keeps the newest ``DATADIET_KEEP_WEIGHT_SNAPSHOTS`` (10,000) of them. The live point is
``GET /v1/weights``; this is what came before it, for charts of source weights and the effective
fraction over steps.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.auth import require
from app.deps import run_db
from app.responses import WeightHistory
from store.meta import WeightSnapshot, _iso

router = APIRouter(prefix="/v1/weights", tags=["weights"], dependencies=[require("read")])
MAX_HISTORY = 1000


def _history(engine: Engine, limit: int) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.scalars(select(WeightSnapshot).order_by(WeightSnapshot.id.desc()).limit(limit))
        return [
            {"step": r.step, "created_at": _iso(r.created_at), "sources": r.sources, "summary": r.summary}
            for r in rows
        ]


@router.get("/history", response_model=WeightHistory)
async def weight_history(
    *,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY, description="at most this many, newest first")] = 100,
) -> dict[str, Any]:
    """``{"snapshots": [{"step", "created_at", "sources": {name: w}, "summary": {...}}]}``, newest first:
    the source weights (each summing to 1) and the weight summary (as in ``GET /v1/weights``) the trainer
    had published when it registered each checkpoint. Empty before the first checkpoint."""
    return {"snapshots": await run_db(request, _history, request.app.state.engine, limit)}
