"""``/healthz`` says the process is alive; ``/readyz`` says whether Redis and the database answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi.testclient import TestClient

from store.config import Settings

if TYPE_CHECKING:
    from conftest import RedisServer


def test_healthz_and_readyz_are_200_when_redis_and_database_answer(app_client: TestClient) -> None:
    assert app_client.get("/healthz").status_code == 200
    ready = app_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": "ok", "database": "ok"}


def test_readyz_is_503_with_retry_after_when_redis_is_gone_and_healthz_stays_200(
    dedicated_redis: RedisServer,
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(make_settings(redis_url=dedicated_redis.url))
    assert client.get("/readyz").status_code == 200

    dedicated_redis.stop()

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["Retry-After"].isdigit()
    error = ready.json()["error"]
    assert error["type"] == "Unavailable"
    assert "redis" in error["detail"]
    assert "database" not in error["checks"]
    assert client.get("/healthz").status_code == 200


def test_requests_that_need_redis_are_503_while_it_is_gone(
    dedicated_redis: RedisServer,
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
) -> None:
    # as a real client sees it: Starlette re-raises errors of catch-all handlers after answering
    client = make_client(make_settings(redis_url=dedicated_redis.url), raise_server_exceptions=False)
    dedicated_redis.stop()

    response = client.post("/v1/samples", json={"samples": [{"source": "a", "input": "x", "target": "y"}]})

    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert response.json()["error"]["type"] == "Unavailable"
