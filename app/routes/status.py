"""``/healthz``, ``/readyz``, ``GET /v1/stats`` and ``GET /metrics``.

``/metrics`` (Prometheus text format 0.0.4, with HELP and TYPE lines) has two parts:

- the buffer's, validation set's and trainer's numbers, read at scrape time by ``StatsCollector``, a
  prometheus_client custom collector built for each scrape: the ``/v1/stats`` values and the published
  weights' summary from Redis, the newest checkpoint's version from the database. Counters kept in Redis
  are exposed as counters, never copied into process-local ones, so every API worker reports the same
  totals;
- the API's request metrics (``app.middleware.HttpMetrics``), in the app's own registry: requests and
  their latency by route template, method and status. These are this process's: with several workers,
  each scrape sees one worker's.

docs/operations.md lists every family with its meaning.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.auth import require
from app.deps import BufferDep, EngineDep, UncheckedBufferDep, run_db
from app.errors import RETRY_AFTER_S
from app.responses import Health, Ready, Stats
from store.config import Settings
from store.meta import latest_checkpoint

router = APIRouter(tags=["status"])


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is alive; checks nothing else."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready)
async def readyz(*, request: Request, buffer: UncheckedBufferDep, engine: EngineDep) -> JSONResponse:
    """Redis and the database answer, and the buffer's shard count is this process's: 200, else 503
    naming what is down (a replica with another DATADIET_BUFFER_SHARDS is not ready: it would refuse
    every request that touches the buffer).

    Both are asked at once, each within its timeout (``DATADIET_REDIS_TIMEOUT``,
    ``DATADIET_DATABASE_TIMEOUT``; 1 s by default), so a hung dependency is reported in about a second.
    """
    settings: Settings = request.app.state.settings

    async def redis_check() -> None:
        try:
            with anyio.fail_after(settings.redis_timeout):
                # keyed reads, not PING: on a Redis Cluster they ask the masters of the buffer's slots
                await buffer.ready()
                if not buffer.layout_checked:
                    await buffer.check_layout()  # asked on every probe until a count is recorded
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
async def metrics(*, request: Request, buffer: BufferDep, engine: EngineDep) -> Response:
    """Prometheus text format: the buffer, validation set and trainer as Redis and the database hold them
    now (read at each scrape), and this process's request counts and latencies."""
    stats, weights = await asyncio.gather(buffer.stats(), buffer.r.get(buffer.k.weights))
    version = await run_db(request, _latest_version, engine)
    scraped = StatsCollector(stats, orjson.loads(weights) if weights else None, version, time.time())
    body = generate_latest(scraped) + generate_latest(request.app.state.http_metrics.registry)
    return Response(body, media_type=METRICS_MEDIA_TYPE)


def _latest_version(engine: Engine) -> int | None:
    with Session(engine) as session:
        latest = latest_checkpoint(session)
        return None if latest is None else latest.version


class StatsCollector(Collector):
    """One scrape's numbers as Prometheus metric families (a prometheus_client custom collector, built for
    each scrape from what Redis and the database hold, so every API worker reports the same values).

    Counters kept in Redis are exposed as counters, never copied into process-local ones. The trainer's
    numbers are its status hash (``Keys.trainer``) as the API reads it, named ``datadiet_reported_*``: the
    trainer's own metrics port (``datadiet_trainer_*``) serves its live values; these say what the API,
    and so every agent, sees. A number the trainer has not reported yet is absent, not 0.
    """

    def __init__(
        self,
        stats: dict[str, Any],
        weights: dict[str, Any] | None,
        checkpoint_version: int | None,
        now: float,
    ) -> None:
        self.stats, self.weights, self.checkpoint_version, self.now = stats, weights, checkpoint_version, now

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
        if self.checkpoint_version is not None:
            yield GaugeMetricFamily(
                "datadiet_checkpoint_version",
                "Version of the newest published checkpoint (GET /v1/checkpoints/latest)",
                self.checkpoint_version,
            )
        summary = (self.weights or {}).get("summary") or {}
        if isinstance(summary.get("effective_fraction"), int | float):
            yield GaugeMetricFamily(
                "datadiet_weights_effective_fraction",
                "Share of live samples whose published weight is at least 0.1 (GET /v1/weights)",
                summary["effective_fraction"],
            )
        reported = (
            ("step", t["step"], "The trainer's last reported step"),
            ("steps_per_second", t["steps_per_s"], "The trainer's recent speed, in steps per second"),
            ("val_loss", t["val_loss"], "The trainer's last loss on the validation set"),
            ("scoring_backlog_samples", t.get("unscored"), "Queued samples the trainer has not scored yet"),
        )
        for name, value, help_text in reported:
            if value is not None:
                yield GaugeMetricFamily(f"datadiet_reported_trainer_{name}", help_text, value)
        if (age := _age_s(t.get("updated_at"), self.now)) is not None:
            yield GaugeMetricFamily(
                "datadiet_reported_trainer_age_seconds",
                "Seconds since the trainer last reported (it reports every few seconds, idle or not)",
                age,
            )


def _age_s(iso: str | None, now: float) -> float | None:
    """Seconds from the ISO 8601 time ``iso`` to the unix time ``now``; None when absent or unreadable."""
    try:
        return max(0.0, now - datetime.fromisoformat(iso).timestamp()) if iso else None
    except ValueError:
        return None
