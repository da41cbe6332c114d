"""Dependency faults seen from the API: real Redis and PostgreSQL made to fail, never mocks.

- a 503 (Redis gone) or 500 (a bug) is a JSON answer on a keep-alive connection that stays open;
- a refused or hung database, and a hung Redis (SIGSTOP), answer 503 with ``Retry-After`` within about a
  second (the default ``DATADIET_REDIS_TIMEOUT`` / ``DATADIET_DATABASE_TIMEOUT`` is 1 s), and the API
  recovers when they come back;
- clients that start a checkpoint download and stop reading hold no database connection;
- a request whose declared body never arrives is answered 408 after ``DATADIET_REQUEST_BODY_TIMEOUT``.

The database is made to refuse or hang through ``tests/faultproxy.py``; Redis is a dedicated server that
the test stops, or freezes with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest
from checkpoint_rows import publish_checkpoint
from fastapi.testclient import TestClient
from faultproxy import FaultProxy
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from store.config import Settings
from store.meta import make_engine
from tests.conftest import drop_all_tables

if TYPE_CHECKING:
    from conftest import RedisServer

SAMPLE = {"source": "a", "input": "1+1=", "target": "2"}
DEADLINE_S = 1.5  # the 1 s default timeouts, plus room for a loaded two-core test machine


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"]["type"] == "Unavailable"


def local_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried ``response``."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


# --- keep-alive -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_503s_and_500s_are_json_on_a_keep_alive_connection_that_stays_open(
    start_api: Callable[..., str], dedicated_redis: RedisServer, tmp_path: Path
) -> None:
    database = tmp_path / "meta.db"
    url = start_api(redis_url=dedicated_redis.url, database_url=f"sqlite:///{database}")
    publish_checkpoint(f"sqlite:///{database}", tmp_path / "trainer-data", 1, b"weights")
    with sqlite3.connect(database) as conn:  # a row the code cannot read: an unexpected error, a 500
        conn.execute("UPDATE checkpoints SET created_at = 'not a timestamp'")
    dedicated_redis.stop()

    with httpx.Client(base_url=url, timeout=10) as client:
        calls = [("GET", "/v1/stats"), ("GET", "/v1/stats"), ("GET", "/v1/checkpoints"),
                 ("POST", "/v1/samples"), ("GET", "/v1/checkpoints"), ("GET", "/healthz")]  # fmt: skip
        answers, ports = [], set()
        for method, path in calls:
            body = {"samples": [SAMPLE]} if method == "POST" else None
            answers.append(client.request(method, path, json=body))
            ports.add(local_port(answers[-1]))

    assert [r.status_code for r in answers] == [503, 503, 500, 503, 500, 200]
    for r in answers[:2] + answers[3:4]:
        assert_unavailable(r)
    for r in (answers[2], answers[4]):
        assert r.json()["error"]["type"] == "InternalError"
    assert len(ports) == 1, "a connection was closed after an error"


# --- a refused or hung database ---------------------------------------------------------------------------


@pytest.fixture
def proxied_postgres(postgres_database: str) -> Iterator[tuple[FaultProxy, str]]:
    """A FaultProxy in front of the session's PostgreSQL database, and the database's URL through it."""
    drop_all_tables(postgres_database)  # the session's database: start from no tables, leave none
    real = make_url(postgres_database)
    with FaultProxy(real.host or "127.0.0.1", real.port or 5432) as proxy:
        yield proxy, real.set(host=proxy.host, port=proxy.port).render_as_string(hide_password=False)
        proxy.set_mode("pass")
    drop_all_tables(postgres_database)


DATABASE_PATHS = ["/v1/checkpoints", "/v1/checkpoints/latest", "/v1/checkpoints/1",
                  "/v1/checkpoints/latest/file", "/v1/checkpoints/1/file", "/readyz"]  # fmt: skip


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_a_refused_or_hung_database_is_503_with_retry_after_within_a_second_and_recovers(
    proxied_postgres: tuple[FaultProxy, str],
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
    tmp_path: Path,
    mode: str,
) -> None:
    proxy, database_url = proxied_postgres
    publish_checkpoint(database_url, tmp_path / "trainer-data", 1, b"weights")
    client = make_client(make_settings(database_url=database_url))
    assert client.get("/v1/checkpoints/latest").status_code == 200

    proxy.set_mode(mode)  # type: ignore[arg-type]
    try:
        for path in DATABASE_PATHS:
            response, took = timed(lambda path=path: client.get(path))
            assert_unavailable(response)
            assert took < DEADLINE_S, f"{path} took {took:.2f}s"
        ready = client.get("/readyz").json()["error"]
        assert set(ready["checks"]) == {"database"}
        # what needs only Redis is unaffected
        assert client.post("/v1/samples", json={"samples": [SAMPLE]}).status_code == 202
    finally:
        proxy.set_mode("pass")

    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/v1/checkpoints/latest/file").content == b"weights"


# --- a hung Redis -----------------------------------------------------------------------------------------


def test_a_hung_redis_is_503_within_a_second_and_recovers(
    dedicated_redis: RedisServer,
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(make_settings(redis_url=dedicated_redis.url))
    assert client.post("/v1/samples", json={"samples": [SAMPLE]}).status_code == 202

    os.kill(dedicated_redis.proc.pid, signal.SIGSTOP)
    try:
        calls = {
            "readyz": lambda: client.get("/readyz"),
            "stats": lambda: client.get("/v1/stats"),
            "weights": lambda: client.get("/v1/weights"),
            "ingest": lambda: client.post("/v1/samples", json={"samples": [{**SAMPLE, "target": "3"}]}),
        }
        for name, call in calls.items():
            response, took = timed(call)
            assert_unavailable(response)
            assert took < DEADLINE_S, f"{name} took {took:.2f}s"
        assert set(client.get("/readyz").json()["error"]["checks"]) == {"redis"}
    finally:
        os.kill(dedicated_redis.proc.pid, signal.SIGCONT)

    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/stats").json()["buffer"]["size"] >= 1


# --- stalled downloads ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stalled_checkpoint_downloads_hold_no_database_connection(
    start_api: Callable[..., str], database_url: str, tmp_path: Path
) -> None:
    publish_checkpoint(database_url, tmp_path / "trainer-data", 1, sparse_size=256 * 1024 * 1024)
    url = start_api(database_url=database_url)
    port = int(url.rsplit(":", 1)[1])

    with ExitStack() as stack:
        for _ in range(20):  # more than the pool's 5 + 10 overflow connections
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /v1/checkpoints/latest/file HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")  # the download started; now stop reading

        response, took = timed(lambda: httpx.get(f"{url}/v1/checkpoints/latest", timeout=5))
        assert response.status_code == 200 and response.json()["version"] == 1
        assert took < DEADLINE_S
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200


# --- a body that never arrives ----------------------------------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length from ``sock``: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.mark.slow
@pytest.mark.parametrize("sent", [b"", b'{"samples": ['], ids=["nothing", "a_part"])
@pytest.mark.parametrize("path", ["/v1/samples", "/v1/validation"])
def test_a_body_that_never_arrives_is_answered_408_in_the_error_shape(
    start_api: Callable[..., str], sent: bytes, path: str
) -> None:
    url = start_api(request_body_timeout="1")
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + sent)

        (status, headers, body), took = timed(lambda: read_response(sock))

    assert status == 408
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["type"] == "RequestTimeout"
    assert 0.9 < took < 5


# --- the engine's limits ----------------------------------------------------------------------------------


def test_only_an_engine_given_a_statement_timeout_cancels_long_queries(postgres_database: str) -> None:
    """The API's engine cancels a statement past DATADIET_DATABASE_TIMEOUT; the trainer's (the default)
    lets a long one finish."""
    api = make_engine(postgres_database, statement_timeout=0.3, pool_timeout=0.5, connect_timeout=1)
    trainer = make_engine(postgres_database)
    try:
        with pytest.raises(OperationalError, match="statement timeout"), api.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.6)"))
        with trainer.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.6)"))
    finally:
        api.dispose()
        trainer.dispose()
    for url in ("sqlite://", "sqlite:///:memory:"):  # no pool timeout on a SingletonThreadPool
        make_engine(url, pool_timeout=0.5).dispose()
