"""The response bodies of every route, as Pydantic models: what the OpenAPI schema documents.

The routes build plain dicts (from Redis, SQL and the trainer's published document) and FastAPI checks them
against these models on the way out, so each model admits exactly what is answered today and changes
nothing a client reads:

- every model allows extra keys (``Open``): a key the store or the trainer adds passes through, as before;
- a value that may be an integer or a float (a sample's ``reward``, its vector ``input``) is typed so that
  neither becomes the other (Pydantic turns an int into a float for a ``float`` field);
- keys that a body has only sometimes (a sample's ``reward`` and ``meta``, the weights document's
  ``method``) default to None and their routes set ``response_model_exclude_unset``, so an absent key stays
  absent rather than coming back as ``null``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Open(BaseModel):
    """A JSON object whose keys beyond the documented ones are passed through unchanged."""

    model_config = ConfigDict(extra="allow")


# --- errors ------------------------------------------------------------------------------------------------


class ErrorDetail(Open):
    type: str = Field(description='what went wrong, e.g. "ValidationError", "NotFound", "Unavailable"')
    detail: str = Field(description="a sentence for a person")
    field: str | None = Field(None, description="the offending field, where there is one")
    errors: list[dict[str, Any]] | None = Field(None, description="one entry per problem, where several")


class ErrorBody(Open):
    """Every error answer: ``{"error": {"type", "detail", ...}}``."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "the request cannot be answered as it is"},
    "5XX": {"model": ErrorBody, "description": "a server error; 503 (with Retry-After) for a dependency"},
}
"""The error answers every documented route may give (``include_router(..., responses=...)``)."""


# --- samples -----------------------------------------------------------------------------------------------


class Ingested(Open):
    """``POST /v1/samples``: how many were stored, how many were already there, and every id in request
    order (the server's id where the sample had none)."""

    accepted: int
    duplicates: int
    ids: list[str]


class StoredSample(Open):
    """A sample as the buffer stores it: its fields as posted, its ``id`` filled in."""

    id: str
    source: str
    input: str | list[Any] = Field(description="as posted: a string, a vector of numbers, or messages")
    target: str | int = Field(description="as posted: a string, or an integer class")
    reward: int | float | None = None
    meta: dict[str, Any] | None = None


class SampleWithWeight(StoredSample):
    """``GET /v1/samples/{id}``: the stored sample and its current weight."""

    weight: float | None = Field(description="1.0 until the trainer has weighted the sample")


# --- validation set ----------------------------------------------------------------------------------------


class ValidationInfo(Open):
    count: int = Field(description="samples in the validation set")
    version: int = Field(description="raised by every PUT and POST; 0 before the first")


# --- weights -----------------------------------------------------------------------------------------------


class Histogram(Open):
    edges: list[float] = Field(description="bin edges; len(counts) + 1 of them")
    counts: list[int]


class WeightSummary(Open):
    count: int = Field(description="live samples")
    effective_fraction: float = Field(description="the fraction with weight >= 0.1")
    mean: float = Field(description="the mean weight, 1.0 by construction")
    histogram: Histogram


class SourceStats(Open):
    count: int
    mean_weight: float


class Weights(Open):
    """``GET /v1/weights``: the document the trainer last published (uniform before the first)."""

    step: int
    updated_at: str | None = Field(description="ISO 8601; null before the trainer's first publication")
    method: str | None = Field(None, description="the weighting rule (absent before the first publication)")
    sources: dict[str, float] = Field(description="each source's share of the training signal; sums to 1")
    source_stats: dict[str, SourceStats] | None = Field(None, description="per source: samples, mean weight")
    summary: WeightSummary


class SampleWeights(Open):
    """``GET /v1/weights/samples``: weights by id; with ``order``, each listed sample's ``source`` too."""

    step: int
    weights: dict[str, float]
    sources: dict[str, str | None] | None = Field(None, description="only with order=asc|desc")


class WeightSnapshotOut(Open):
    step: int
    created_at: str = Field(description="ISO 8601, UTC")
    sources: dict[str, float] = Field(description="each source's share of the training signal; sums to 1")
    summary: dict[str, Any] = Field(description="the weight summary, as GET /v1/weights had it then")


class WeightHistory(Open):
    """``GET /v1/weights/history``: the weight snapshots recorded with each checkpoint, newest first."""

    snapshots: list[WeightSnapshotOut]


# --- checkpoints -------------------------------------------------------------------------------------------


class CheckpointSummary(Open):
    version: int
    step: int
    created_at: str = Field(description="ISO 8601, UTC")
    sha256: str
    size: int = Field(description="bytes")
    metrics: dict[str, Any] = Field(description='what the trainer measured, e.g. {"val_loss": 1.5}')


class CheckpointDetail(CheckpointSummary):
    model: str = Field(description="the model kind")
    config: dict[str, Any] = Field(description="the model kind's configuration")


CHECKPOINT_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the safetensors file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {
        "description": "the requested byte range",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    304: {"description": "If-None-Match named this file's ETag: nothing to send"},
}


# --- quarantine --------------------------------------------------------------------------------------------


class QuarantinedSample(Open):
    id: str
    source: str
    reason: str
    step: int = Field(description="the trainer step it was quarantined at")
    quarantined_at: str = Field(description="ISO 8601, UTC")
    sample: dict[str, Any] | None = Field(
        None, description="the sample as it was posted; only for admin keys (and with auth off)"
    )


class Quarantine(Open):
    count: int = Field(description="every sample ever quarantined")
    samples: list[QuarantinedSample] = Field(description="the newest, newest first")


# --- status ------------------------------------------------------------------------------------------------


class Health(Open):
    status: str


class ReadyChecks(Open):
    redis: str
    database: str


class Ready(Open):
    status: str
    checks: ReadyChecks


class BufferStats(Open):
    size: int
    capacity: int
    ingested: int
    duplicates: int
    evicted: int
    quarantined: int


class TrainerStats(Open):
    step: int | None
    steps_per_s: float | None
    val_loss: float | None
    updated_at: str | None
    unscored: int | None = Field(
        None, description="the trainer's unscored queue (bounded: DATADIET_MAX_UNSCORED)"
    )
    state: str | None = Field(
        None,
        description="training; training_without_validation_set (uniform until PUT /v1/validation); idle "
        "(nothing new to learn: it resumes when samples or a validation set arrive); waiting_for_samples",
    )


class Stats(Open):
    buffer: BufferStats
    validation: ValidationInfo
    trainer: TrainerStats
