"""Shared fixtures: real Redis servers, real databases, the real app (in-process and as a uvicorn process).

Nothing here is mocked. Redis is a throw-away ``redis-server`` on a free port (never the machine's shared
one on 6379); SQLite lives in the test's tmp dir; PostgreSQL is used when ``DATADIET_TEST_DATABASE_URL``
names a server (``postgresql://root@127.0.0.1:5432/test``): the tests run in a database of their own,
created for the session and dropped at its end.

The process helpers (a free port, a scratch redis-server, the API's uvicorn command line, waiting for
``/readyz``, stopping a process group) are store/processes.py's, the same the supervisor and the benchmarks
use.

Fixtures, from low to high level:

    redis_server       session   URL of the session's redis-server
    redis_url          test      the same URL, flushed before the test
    redis_client       test      a sync redis-py client on it
    dedicated_redis    test      a RedisServer of the test's own, that it may kill
    database_url       test      parametrised: sqlite, postgresql (skipped without the env var)
    make_settings      test      Settings(**overrides) on redis_url and the tmp dir
    make_client        test      a started TestClient (lifespan run) for create_app(settings)
    app_client         test      make_client() with the default settings
    start_api          test      run the API under uvicorn in a subprocess, returns its base URL
    live_api           test      start_api() with the default environment
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, create_engine, text
from sqlalchemy.engine import make_url

from app.main import create_app
from store.config import Settings
from store.meta import normalise_url
from store.processes import (
    RedisServer,
    datadiet_env,
    start_api_process,
    start_redis_server,
    stop_process_group,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "DATADIET_TEST_DATABASE_URL"


# --- Redis ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's redis-server; yields its URL."""
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, empty: FLUSHALL before each test keeps tests independent."""
    with redis.Redis.from_url(redis_server) as r:
        r.flushall()
    return redis_server


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client on the test's (flushed) Redis."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone, which it may stop to simulate an outage."""
    server = start_redis_server(tmp_path / "dedicated-redis")
    yield server
    server.stop()


# --- databases --------------------------------------------------------------------------------------------


def drop_all_tables(url: str) -> None:
    """Drop every table in the database at ``url``, alembic_version included."""
    engine = create_engine(normalise_url(url))
    try:
        meta = MetaData()
        meta.reflect(engine)
        meta.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session on the server of ``DATADIET_TEST_DATABASE_URL``."""
    server_url = os.environ.get(POSTGRES_ENV)
    if not server_url:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV}, e.g. postgresql://root@127.0.0.1:5432/test")
    name = f"dd_test_{secrets.token_hex(6)}"
    admin = create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with no tables in it: SQLite in the tmp dir, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    url: str = request.getfixturevalue("postgres_database")
    drop_all_tables(url)
    yield url
    drop_all_tables(url)


# --- the app ----------------------------------------------------------------------------------------------


@pytest.fixture
def make_settings(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """``make_settings(**overrides)``: Settings on the test's Redis and tmp dir.

    Neither a ``.env`` file nor the developer's ``DATADIET_*`` variables apply (they are unset for the test).
    """
    for name in os.environ:
        if name.startswith("DATADIET_") and name != POSTGRES_ENV:
            monkeypatch.delenv(name)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"redis_url": redis_url, "data_dir": tmp_path / "data", **overrides}
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """``make_client(settings)``: a TestClient whose lifespan has run (Redis and the engine open).

    Server errors raise in the test unless ``raise_server_exceptions=False`` (then the client sees the
    response a real one would get). Every client made is closed (lifespan shut down) after the test.
    """
    with ExitStack() as stack:

        def make(settings: Settings, *, raise_server_exceptions: bool = True) -> TestClient:
            app = create_app(settings)
            return stack.enter_context(TestClient(app, raise_server_exceptions=raise_server_exceptions))

        yield make


@pytest.fixture
def app_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    """The app with default settings (tiny-gpt, text samples) on the test's Redis and SQLite."""
    return make_client(make_settings())


# --- the API as a process ---------------------------------------------------------------------------------


@pytest.fixture
def start_api(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``start_api(workers=1, **settings)``: the real API under uvicorn in a subprocess; returns its URL.

    ``settings`` become ``DATADIET_*`` variables (``buffer_max_samples="10"``); Redis is the test's and
    the data dir (with its SQLite) is under the tmp dir unless given. The process group is killed at the
    end of the test. The server runs in the tmp dir, so no ``.env`` of the developer's applies.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def start(workers: int = 1, **settings: str) -> str:
        run_dir = tmp_path / f"api-{len(procs)}"
        run_dir.mkdir()
        env = datadiet_env(**{"redis_url": redis_url, "data_dir": str(run_dir / "data"), **settings})
        proc, base_url = start_api_process(env, log=run_dir / "api.log", cwd=run_dir, workers=workers)
        procs.append(proc)
        return base_url

    yield start
    for proc in procs:
        stop_process_group(proc)


@pytest.fixture
def live_api(start_api: Callable[..., str]) -> str:
    """Base URL of the real API (one uvicorn worker) on the test's Redis and a SQLite in the tmp dir."""
    return start_api()
