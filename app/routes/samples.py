"""``POST /v1/samples`` (ingest) and ``GET /v1/samples/{id}``."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request, Response

from app.auth import require
from app.deps import BufferDep, SpecDep, read_json
from app.errors import NotFound
from app.responses import Ingested, SampleWithWeight
from app.schema import ID_PATTERN, INGEST_BODY, samples_list, to_record, validate_samples

router = APIRouter(prefix="/v1/samples", tags=["samples"])
INGEST, ADMIN = [require("ingest")], [require("admin")]
SampleId = Annotated[str, Path(pattern=f"^{ID_PATTERN}$", description="1-128 characters of [A-Za-z0-9._:-]")]


@router.post(
    "",
    status_code=202,
    response_class=Response,  # the body is written here with orjson (the hot path), not by FastAPI
    responses={202: {"model": Ingested, "description": "stored, all of them (duplicates included)"}},
    openapi_extra={"requestBody": INGEST_BODY},
    dependencies=INGEST,
)
async def post_samples(*, request: Request, buffer: BufferDep, spec: SpecDep) -> Response:
    """Ingest 1-10,000 samples, all or nothing; re-posting an id is a duplicate, not an error."""
    samples = samples_list(await read_json(request))
    validate_samples(samples, spec)
    records = [to_record(s) for s in samples]
    result = await buffer.ingest(records)
    body = {"accepted": result.accepted, "duplicates": result.duplicates, "ids": [r.id for r in records]}
    return Response(orjson.dumps(body), status_code=202, media_type="application/json")


@router.get(
    "/{sample_id}", response_model=SampleWithWeight, response_model_exclude_unset=True, dependencies=ADMIN
)
async def get_sample(*, sample_id: SampleId, buffer: BufferDep) -> dict[str, Any]:
    """One stored sample with its current weight (1.0 until the trainer has weighted it)."""
    doc = await buffer.get(sample_id)
    if doc is None:
        raise NotFound(f"no sample with id {sample_id!r} in the buffer (never posted, or evicted)")
    return doc
