"""``/healthz``, ``/readyz``, ``GET /v1/stats`` and ``GET /metrics``.

``/metrics`` (Prometheus text format 0.0.4, with HELP and TYPE lines) has two parts:

- the buffer's, validation set's and trainer's numbers, read from Redis at scrape time (the values
  ``/v1/stats`` reports) by ``StatsCollector``, a custom collector built for each scrape: counters kept in
  Redis are exposed as counters, never copied into process-local ones, so every API worker reports the same
  totals;
- the API's request metrics (``app.middleware.HttpMetrics``), in the app's own registry: requests by route
  template, method and status, and their latency by route template and method. These are this process's:
  with several workers, each scrape sees one worker's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import text
from sqlalchemy.engine import Engine

from app.auth import require
from app.deps import BufferDep, EngineDep, run_db
from app.errors import RETRY_AFTER_S
from app.responses import Health, Ready, Stats
from store.config import Settings

router = APIRouter(tags=["status"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is alive; checks nothing else."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready)
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


@router.get("/v1/stats", response_model=Stats, dependencies=[require("read")])
async def stats(*, buffer: BufferDep) -> dict[str, Any]:
    """Buffer size and counters, the validation set, and the trainer's progress."""
    return await buffer.stats()


METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes


@router.get(
    "/metrics",
    response_class=Response,  # no JSON body to document; errors stay JSON (ERROR_RESPONSES)
    responses={
        200: {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
    dependencies=[require("read")],
)
async def metrics(*, request: Request, buffer: BufferDep) -> Response:
    """Prometheus text format: the buffer, validation set and trainer (from Redis, at scrape time), and
    this process's request counts and latencies."""
    scraped = StatsCollector(await buffer.stats())
    body = generate_latest(scraped) + generate_latest(request.app.state.http_metrics.registry)
    return Response(body, media_type=METRICS_MEDIA_TYPE)


class StatsCollector:
    """The numbers of one ``/v1/stats`` answer as Prometheus metrics (names as dashboards know them)."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        b, v, t = self.stats["buffer"], self.stats["validation"], self.stats["trainer"]
        yield GaugeMetricFamily("datadiet_buffer_samples", "Samples in the buffer now", value=b["size"])
        yield GaugeMetricFamily(
            "datadiet_buffer_capacity", "Samples the buffer holds before it evicts", value=b["capacity"]
        )
        for name, help_text in (
            ("ingested", "Samples stored since the buffer was created"),
            ("duplicates", "Samples posted again under an id already stored (not stored again)"),
            ("evicted", "Samples evicted to keep the buffer within its capacity"),
            ("quarantined", "Samples the trainer could not use (GET /v1/quarantine lists them)"),
        ):
            yield CounterMetricFamily(f"datadiet_samples_{name}_total", help_text, value=b[name])
        yield GaugeMetricFamily(
            "datadiet_validation_version", "Version of the validation set (0 before the first)", v["version"]
        )
        yield GaugeMetricFamily("datadiet_validation_samples", "Samples in the validation set", v["count"])
        if t["step"] is not None:
            yield GaugeMetricFamily("datadiet_trainer_step", "The trainer's last reported step", t["step"])
        if t["steps_per_s"] is not None:
            yield GaugeMetricFamily(
                "datadiet_trainer_steps_per_second", "The trainer's recent speed", t["steps_per_s"]
            )
        if t["val_loss"] is not None:
            yield GaugeMetricFamily(
                "datadiet_trainer_val_loss", "The trainer's last loss on the validation set", t["val_loss"]
            )
