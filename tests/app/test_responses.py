"""Response models (app/responses.py): the OpenAPI schema documents every body, and checking the bodies
against the models changes nothing a client reads (no key dropped or added, no int turned into a float)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from fastapi.testclient import TestClient

from store.config import Settings
from store.feed import TrainerFeed
from store.keys import Keys

MLP = {"model": "mlp", "model_params": {"n_features": 2, "n_classes": 3}}
ERROR_REF = "#/components/schemas/ErrorBody"


def test_every_operation_documents_its_answer_and_its_errors(app_client: TestClient) -> None:
    doc = app_client.get("/openapi.json").json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            success = [code for code in responses if code.startswith("2")]
            assert success, f"{method} {path} documents no success"
            for code in success:
                content = responses[code]["content"]
                assert all(media["schema"] for media in content.values()), f"{method} {path} {code}"
            for errors in ("4XX", "5XX"):
                assert responses[errors]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
            assert "422" not in responses  # FastAPI's own {"detail": [...]} is not what we answer


def test_a_stored_sample_comes_back_as_posted_with_its_weight(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    client = make_client(make_settings(**MLP))
    samples = [
        {"id": "plain", "source": "a", "input": [1, 2], "target": 0},
        {"id": "full", "source": "a", "input": [1.5, -2], "target": 2, "reward": 1, "meta": {"k": [1, None]}},
    ]
    assert client.post("/v1/samples", json={"samples": samples}).status_code == 202

    plain, full = (client.get(f"/v1/samples/{s['id']}").json() for s in samples)

    assert plain == {**samples[0], "weight": 1.0}  # no reward or meta key: absent, not null
    assert full == {**samples[1], "weight": 1.0}
    assert isinstance(full["reward"], int) and isinstance(full["input"][1], int)


def test_weights_keep_their_keys_before_and_after_the_trainer_publishes(
    app_client: TestClient, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    app_client.post(
        "/v1/samples", json={"samples": [{"id": "s1", "source": "a", "input": "x", "target": "y"}]}
    )
    before = app_client.get("/v1/weights").json()
    assert set(before) == {"step", "updated_at", "sources", "summary"}
    assert before["updated_at"] is None and before["summary"]["count"] == 1

    published: dict[str, Any] = {
        "step": 3,
        "updated_at": "2025-01-01T00:00:00+00:00",
        "method": "bilevel",
        "sources": {"a": 1.0},
        "source_stats": {"a": {"count": 1, "mean_weight": 1.0}},
        "summary": {
            "count": 1,
            "effective_fraction": 1.0,
            "mean": 1.0,
            "histogram": {"edges": [0.0, 4.000000001], "counts": [1]},
        },
        "a_key_a_later_trainer_adds": {"x": 1},
    }
    feed = TrainerFeed(redis.Redis.from_url(redis_url), Keys(make_settings().redis_prefix))
    assert feed.lease.acquire(wait=False)
    feed.publish_weights(published, [], [])

    assert app_client.get("/v1/weights").json() == published
    by_id = app_client.get("/v1/weights/samples", params={"ids": "s1,unknown"}).json()
    assert by_id == {"step": 3, "weights": {"s1": 1.0}}  # no "sources" key unless ranked
    ranked = app_client.get("/v1/weights/samples", params={"order": "asc", "limit": 5}).json()
    assert ranked == {"step": 3, "weights": {"s1": 1.0}, "sources": {"s1": "a"}}
