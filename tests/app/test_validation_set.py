"""``/v1/validation``: PUT replaces the set, POST appends, both bump the version (recorded in SQL)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.config import Settings
from store.feed import TrainerFeed
from store.keys import Keys
from store.meta import ValidationVersion, make_engine


def val_samples(*names: str) -> dict[str, Any]:
    """A validation body; validation samples may leave out ``source``."""
    return {"samples": [{"input": f"{n}?", "target": n} for n in names]}


def put(client: TestClient, *names: str) -> httpx.Response:
    return client.put("/v1/validation", json=val_samples(*names))


def append(client: TestClient, *names: str) -> httpx.Response:
    return client.post("/v1/validation", json=val_samples(*names))


def test_validation_set_starts_empty_at_version_0(app_client: TestClient) -> None:
    assert app_client.get("/v1/validation").json() == {"count": 0, "version": 0}


def test_put_replaces_post_appends_and_each_bumps_the_version(
    app_client: TestClient, redis_client: redis.Redis
) -> None:
    assert put(app_client, "a", "b", "c").json() == {"count": 3, "version": 1}
    assert append(app_client, "d", "e").json() == {"count": 5, "version": 2}
    assert app_client.get("/v1/validation").json() == {"count": 5, "version": 2}

    assert put(app_client, "f").json() == {"count": 1, "version": 3}

    assert app_client.get("/v1/validation").json() == {"count": 1, "version": 3}
    version, samples = TrainerFeed(redis_client, Keys()).validation()
    assert version == 3
    assert [s["target"] for s in samples] == ["f"]


def test_appended_samples_follow_the_existing_ones_in_order(
    app_client: TestClient, redis_client: redis.Redis
) -> None:
    put(app_client, "a", "b")
    append(app_client, "c")

    _, samples = TrainerFeed(redis_client, Keys()).validation()

    assert [s["target"] for s in samples] == ["a", "b", "c"]


def test_every_validation_version_is_recorded_in_sql(
    database_url: str, make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    client = make_client(make_settings(database_url=database_url))
    put(client, "a", "b", "c")
    append(client, "d")
    put(client, "e", "f")

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            rows = session.scalars(select(ValidationVersion).order_by(ValidationVersion.version)).all()
            recorded = [(r.version, r.count, r.mode) for r in rows]
    finally:
        engine.dispose()
    assert recorded == [(1, 3, "replace"), (2, 4, "append"), (3, 2, "replace")]


def test_a_bad_validation_sample_is_422_naming_it_and_changes_nothing(app_client: TestClient) -> None:
    put(app_client, "a")
    body = {"samples": [{"input": "x?", "target": "x"}, {"input": "y?", "target": ""}]}

    response = app_client.post("/v1/validation", json=body)

    assert response.status_code == 422
    assert response.json()["error"]["detail"].startswith("samples[1].target:")
    assert app_client.get("/v1/validation").json() == {"count": 1, "version": 1}


def test_a_validation_set_over_its_limit_is_422_and_changes_nothing(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    client = make_client(make_settings(validation_max_samples=5))

    too_many = put(client, *"abcdef")
    assert too_many.status_code == 422
    assert too_many.json()["error"]["type"] == "ValidationError"
    assert client.get("/v1/validation").json() == {"count": 0, "version": 0}

    put(client, "a", "b", "c")
    overflow = append(client, "d", "e", "f")
    assert overflow.status_code == 422
    assert overflow.json()["error"]["type"] == "ValidationError"
    assert client.get("/v1/validation").json() == {"count": 3, "version": 1}

    assert put(client, *"vwxyz").json() == {
        "count": 5,
        "version": 2,
    }  # a replacement may use the full limit
