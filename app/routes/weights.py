"""Current sampling weights, as the trainer last published them (never recomputed here)."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from app.auth import require
from app.conditional import etag_of, not_modified
from app.deps import BufferDep
from app.errors import InvalidInput
from app.responses import SampleWeights, Weights
from store.histogram import uniform_histogram

router = APIRouter(prefix="/v1/weights", tags=["weights"], dependencies=[require("read")])
MAX_IDS = 10_000
MAX_ID_LENGTH = 128


@router.get("", response_model=Weights, response_class=JSONResponse)
async def get_weights(*, request: Request, buffer: BufferDep) -> Response:
    """Per-source weights (summing to 1) and a summary of the per-sample weights.

    The document carries a strong ``ETag``; ``If-None-Match`` with it answers 304 until the trainer
    publishes again (RFC 9110 §13.1.2), so polling an unchanged document costs no body."""
    raw = await buffer.weights_raw()
    if raw is None:  # the trainer has not published yet: everything is uniform
        size = (await buffer.stats())["buffer"]["size"]
        hist = uniform_histogram(size)  # the trainer's bins (store.histogram), every sample at weight 1.0
        summary = {"count": size, "effective_fraction": 1.0, "mean": 1.0, "histogram": hist}
        raw = orjson.dumps({"step": 0, "updated_at": None, "sources": {}, "summary": summary})
    headers = {"ETag": etag_of(raw), "Cache-Control": "no-cache"}
    if not_modified(request, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(raw, media_type="application/json", headers=headers)


@router.get("/samples", response_model=SampleWeights, response_model_exclude_unset=True)
async def get_sample_weights(
    *,
    buffer: BufferDep,
    ids: str | None = Query(None, pattern=r"^[A-Za-z0-9._:,-]*$", description="comma-separated sample ids"),
    order: Literal["asc", "desc"] | None = Query(None, description="lowest (asc) or highest (desc) first"),
    limit: int = Query(10, ge=1, le=10_000),
) -> Any:
    """Weights of the given ids (unknown ids are absent), or the ``limit`` lowest/highest weighted samples."""
    if ids is not None:  # the pattern lets through only the id alphabet and commas
        wanted = ids.split(",")
        if (count := len(wanted) - wanted.count("")) > MAX_IDS:
            raise InvalidInput(f"at most {MAX_IDS} ids per request, got {count}", field="ids")
        if max(map(len, wanted)) > MAX_ID_LENGTH:
            bad = next(i for i in wanted if len(i) > MAX_ID_LENGTH)[:40] + "..."
            raise InvalidInput(f"ids: {bad!r} is not 1-128 characters of [A-Za-z0-9._:-]", field="ids")
        step, members = await buffer.weights_of(ids)
        body = b'{"step":%d,"weights":{%s}}' % (step, members)
        return Response(body, media_type="application/json")
    if order is None:
        raise InvalidInput("give either ids=a,b,c or order=asc|desc (with limit)", field="ids")
    step = await buffer.weights_step()
    rows = await buffer.ranked(order, limit)
    return {
        "step": step,
        "weights": {r["id"]: r["weight"] for r in rows},
        "sources": {r["id"]: r["source"] for r in rows},
    }
