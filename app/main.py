"""The datadiet API.

Run it:
    datadiet serve                      # 127.0.0.1:8000, embedded Redis and SQLite under ./datadiet-data
    datadiet serve --host 0.0.0.0 --port 8000 --workers 4   # with DATADIET_REDIS_URL / DATABASE_URL set
    uvicorn --factory app.main:create_app

The app is stateless: everything lives in Redis and the database, which the lifespan opens and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.concurrency import run_in_threadpool

from app.auth import parse_keys
from app.errors import install_error_handlers
from app.logs import REQUEST_ID_MIDDLEWARE, CorrelationIdMiddleware, setup_logging
from app.middleware import ErrorsAsJSON, HeadAsGet, HttpMetrics, RequestMetrics
from app.responses import ERROR_RESPONSES
from app.routes import (
    checkpoints,
    dashboard,
    docs,
    quarantine,
    samples,
    status,
    validation,
    weight_history,
    weights,
)
from app.schema import InputSpec
from store.buffer import SampleBuffer
from store.config import Settings
from store.embedded import resolve_redis_url
from store.meta import check_schema, make_engine, migrate
from store.redis_client import announcements_client, async_client

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    setup_logging(settings.log_format)  # here, not in the CLI: uvicorn's workers each build their own app
    api_keys = parse_keys(settings.api_keys)  # a malformed or empty spec fails here, at start-up

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_data_dir()
        url, embedded = resolve_redis_url(settings.redis_url, settings.data_dir)
        # a hung Redis answers 503 after redis_timeout; a dropped connection (a restart) is retried once
        # redis.asyncio.Redis, or its RedisCluster for redis+cluster:// (store.redis_client)
        client = async_client(
            url,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        database_url = settings.resolved_database_url
        engine = make_engine(
            database_url,
            connect_timeout=settings.database_timeout,
            pool_timeout=settings.database_timeout,
            statement_timeout=settings.database_timeout,
        )
        try:
            if settings.auto_migrate:
                await run_in_threadpool(_migrate, database_url)
            else:  # `datadiet migrate` owns the schema: refuse to serve on one this code does not know
                await run_in_threadpool(check_schema, engine)
            app.state.settings = settings
            app.state.api_keys = api_keys
            app.state.engine = engine
            app.state.input_spec = InputSpec.from_settings(
                settings.resolved_input_kind, settings.model_params
            )
            app.state.checkpoint_rows = {}  # version -> its row, read once (app/routes/checkpoints.py)
            app.state.buffer = SampleBuffer(
                client,
                settings.keys,
                settings.buffer_max_samples,
                settings.validation_max_samples,
            )
            # the cached weights document follows the trainer's announcements on a connection of its own
            # a socket timeout too (reads for messages pass their own): a hung Redis cannot hold the
            # subscription's handshake, and so a shutdown, forever
            announcements = announcements_client(
                url,
                socket_connect_timeout=settings.redis_timeout,
                socket_timeout=max(5.0, settings.redis_timeout),
                socket_keepalive=True,
            )
            stop_following = asyncio.Event()
            follower = asyncio.create_task(
                app.state.buffer.follow_publications(announcements, stop_following)
            )
            try:
                yield
            finally:
                # cancelled to stop at once; should a read inside redis-py swallow the cancellation, the
                # event still ends its loop within a second
                stop_following.set()
                follower.cancel()
                await asyncio.wait({follower}, timeout=3.0)
                with contextlib.suppress(redis.RedisError, OSError):
                    await announcements.aclose()
        finally:
            await client.aclose()
            engine.dispose()
            if embedded is not None:
                embedded.stop()

    app = FastAPI(
        title="datadiet",
        summary="Online data selection for models that keep learning from their agents",
        version="0.1.0",
        lifespan=lifespan,
        # served by app.routes.docs, behind the read scope when API keys are configured
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.state.http_metrics = HttpMetrics()  # served by GET /metrics with the buffer's numbers
    app.add_middleware(ErrorsAsJSON)
    app.add_middleware(RequestMetrics, metrics=app.state.http_metrics)
    app.add_middleware(HeadAsGet)  # outermost but one, so it also drops the body of error answers
    app.add_middleware(CorrelationIdMiddleware, **REQUEST_ID_MIDDLEWARE)  # X-Request-ID on every answer
    for module in (
        samples,
        validation,
        weights,
        weight_history,
        checkpoints,
        quarantine,
        status,
        docs,
        dashboard,
    ):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    return app


def _migrate(database_url: str) -> None:
    """Migrate on an engine of its own, without the API's short statement timeout (a migration, or the
    wait for another process's migration lock, may take longer)."""
    engine = make_engine(database_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
