"""The trusted validation set: ``PUT`` replaces it, ``POST`` appends, ``GET`` reports count and version."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from app.auth import require
from app.deps import BufferDep, EngineDep, SpecDep, read_json, run_db
from app.errors import InvalidInput
from app.responses import ValidationInfo
from app.schema import VALIDATION_BODY, samples_list, to_record, validate_samples
from store.buffer import ValidationSetFull
from store.meta import record_validation_version

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/validation", tags=["validation"], dependencies=[require("admin")])


async def _write(request: Request, buffer: BufferDep, spec: SpecDep, engine: EngineDep, append: bool) -> dict:
    samples = samples_list(await read_json(request), max_samples=buffer.validation_max)
    validate_samples(samples, spec, require_source=False)
    payloads = [to_record(s).payload for s in samples]
    try:
        count, version = await buffer.set_validation(payloads, append=append)
    except ValidationSetFull as e:
        raise InvalidInput(str(e), field="samples") from None
    await _record(request, engine, version, count, "append" if append else "replace")
    return {"count": count, "version": version}


async def _record(request: Request, engine: EngineDep, version: int, count: int, mode: str) -> None:
    try:  # bounded by DATADIET_DATABASE_TIMEOUT: a hung database cannot hold the request
        await run_db(request, record_validation_version, engine, version, count, mode)
    except Exception:  # the set itself is safely in Redis; the history row is best effort
        log.exception("could not record validation version %d", version)


@router.put("", response_model=ValidationInfo, openapi_extra={"requestBody": VALIDATION_BODY})
async def replace_validation(
    *, request: Request, buffer: BufferDep, spec: SpecDep, engine: EngineDep
) -> dict:
    """Replace the validation set: the task the trainer optimises for changes."""
    return await _write(request, buffer, spec, engine, append=False)


@router.post("", response_model=ValidationInfo, openapi_extra={"requestBody": VALIDATION_BODY})
async def append_validation(*, request: Request, buffer: BufferDep, spec: SpecDep, engine: EngineDep) -> dict:
    """Append samples to the validation set (a new version)."""
    return await _write(request, buffer, spec, engine, append=True)


@router.get("", response_model=ValidationInfo)
async def get_validation(*, buffer: BufferDep) -> dict:
    count, version = await buffer.validation_info()
    return {"count": count, "version": version}
