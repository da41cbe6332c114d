"""``GET /v1/quarantine``: samples the trainer could not use, with the reason each was set aside.

A sample is quarantined when it fails to collate for the model, or its loss or gradient is not finite
(CONTRACT.md, "quarantined"): the trainer acknowledges it, never trains on it, counts it in
``/v1/stats`` (``buffer.quarantined``) and lists it here; training goes on.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from app.auth import may, require
from app.deps import BufferDep
from app.responses import Quarantine

router = APIRouter(prefix="/v1/quarantine", tags=["quarantine"], dependencies=[require("read")])


@router.get("", response_model=Quarantine)
async def list_quarantine(
    *,
    request: Request,
    buffer: BufferDep,
    limit: int = Query(100, ge=1, le=1000, description="newest first, at most this many"),
) -> dict[str, Any]:
    """``{"count": n, "samples": [{"id", "source", "reason", "step", "quarantined_at", "sample"}]}``:
    the total ever quarantined and the ``limit`` newest (the list keeps about the newest 10,000).

    ``sample`` (what was posted) is there for keys that may read sample contents (``admin``, as for
    ``GET /v1/samples/{id}``) and when auth is off; a ``read`` key sees the rest, not what agents sent."""
    stats = await buffer.stats()
    samples = await buffer.quarantined(limit)
    if not may(request, "admin"):
        for s in samples:
            del s["sample"]
    return {"count": stats["buffer"]["quarantined"], "samples": samples}
