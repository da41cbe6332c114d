"""Current sampling weights, as the trainer last published them (never recomputed here)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query

from app.auth import require
from app.deps import BufferDep
from app.errors import InvalidInput
from app.responses import SampleWeights, Weights
from app.schema import ID_RE
from store.histogram import uniform_histogram

router = APIRouter(prefix="/v1/weights", tags=["weights"], dependencies=[require("read")])
MAX_IDS = 10_000


@router.get("", response_model=Weights, response_model_exclude_unset=True)
async def get_weights(*, buffer: BufferDep) -> dict[str, Any]:
    """Per-source weights (summing to 1) and a summary of the per-sample weights."""
    doc = await buffer.weights_doc()
    if doc is None:  # the trainer has not published yet: everything is uniform
        size = (await buffer.stats())["buffer"]["size"]
        hist = uniform_histogram(size)  # the trainer's bins (store.histogram), every sample at weight 1.0
        summary = {"count": size, "effective_fraction": 1.0, "mean": 1.0, "histogram": hist}
        return {"step": 0, "updated_at": None, "sources": {}, "summary": summary}
    return doc


@router.get("/samples", response_model=SampleWeights, response_model_exclude_unset=True)
async def get_sample_weights(
    *,
    buffer: BufferDep,
    ids: str | None = Query(None, pattern=r"^[A-Za-z0-9._:,-]*$", description="comma-separated sample ids"),
    order: Literal["asc", "desc"] | None = Query(None, description="lowest (asc) or highest (desc) first"),
    limit: int = Query(10, ge=1, le=10_000),
) -> dict[str, Any]:
    """Weights of the given ids (unknown ids are absent), or the ``limit`` lowest/highest weighted samples."""
    doc = await buffer.weights_doc()
    step = doc["step"] if doc else 0
    if ids is not None:
        wanted = [i for i in ids.split(",") if i]
        if len(wanted) > MAX_IDS:
            raise InvalidInput(f"at most {MAX_IDS} ids per request, got {len(wanted)}", field="ids")
        if (bad := next((i for i in wanted if not ID_RE.fullmatch(i)), None)) is not None:
            shown = bad if len(bad) <= 40 else bad[:40] + "..."
            raise InvalidInput(f"ids: {shown!r} is not 1-128 characters of [A-Za-z0-9._:-]", field="ids")
        return {"step": step, "weights": await buffer.weights_of(wanted)}
    if order is None:
        raise InvalidInput("give either ids=a,b,c or order=asc|desc (with limit)", field="ids")
    rows = await buffer.ranked(order, limit)
    return {
        "step": step,
        "weights": {r["id"]: r["weight"] for r in rows},
        "sources": {r["id"]: r["source"] for r in rows},
    }
