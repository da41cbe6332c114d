"""API keys with scopes: 401 without or with an unknown key, 403 without the scope, admin holds them all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth import parse_keys

KEYS = "agent-key:ingest,reader-key:read,ops-key:admin"
SAMPLE = {"source": "a", "input": "1+1=", "target": "2"}


@pytest.fixture
def api(make_settings: Callable[..., Any], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(api_keys=KEYS))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_requests_without_a_key_get_401_with_the_error_shape(api: TestClient) -> None:
    r = api.post("/v1/samples", json={"samples": [SAMPLE]})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "Unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert api.get("/v1/weights", headers=auth("wrong")).status_code == 401


def test_each_scope_opens_its_endpoints_only(api: TestClient) -> None:
    assert api.post("/v1/samples", json={"samples": [SAMPLE]}, headers=auth("agent-key")).status_code == 202
    assert api.get("/v1/weights", headers=auth("agent-key")).status_code == 403
    assert api.get("/v1/weights", headers=auth("reader-key")).status_code == 200
    assert api.get("/v1/stats", headers=auth("reader-key")).status_code == 200
    r = api.post("/v1/samples", json={"samples": [SAMPLE]}, headers=auth("reader-key"))
    assert r.status_code == 403 and "ingest" in r.json()["error"]["detail"]
    r = api.put("/v1/validation", json={"samples": [SAMPLE]}, headers=auth("reader-key"))
    assert r.status_code == 403


def test_admin_holds_every_scope_and_health_needs_none(api: TestClient) -> None:
    assert api.put("/v1/validation", json={"samples": [SAMPLE]}, headers=auth("ops-key")).status_code == 200
    assert api.post("/v1/samples", json={"samples": [SAMPLE]}, headers=auth("ops-key")).status_code == 202
    assert api.get("/v1/checkpoints", headers=auth("ops-key")).status_code == 200
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200


def test_malformed_key_spec_is_rejected_naming_the_entry_but_never_the_key() -> None:
    assert parse_keys("a:ingest+read, b:admin") == {"a": {"ingest", "read"}, "b": {"admin"}}
    with pytest.raises(ValueError, match=r"entry 2 \(se\.\.\.:write\)") as bad:
        parse_keys("agent-secret-1:read,secret-2:write")
    assert "secret-2" not in str(bad.value)
    # a key listed twice: which scopes were meant is a guess (the last one silently won)
    with pytest.raises(ValueError, match=r"entry 2 .* the same key as entry 1") as twice:
        parse_keys("agent-secret:ingest,agent-secret:read")
    assert "agent-secret" not in str(twice.value)


def test_what_agents_sent_is_readable_by_admin_keys_only(api: TestClient, redis_client: Any) -> None:
    """Sample contents (input, target) are data an agent posted: a ``read`` key (a dashboard, an agent
    pulling checkpoints) sees ids, sources, weights and reasons, never the contents, on any endpoint that
    lists samples; an admin key sees them."""
    from store.feed import TrainerFeed
    from store.keys import Keys

    secret = {"id": "s1", "source": "a", "input": "secret-input-7", "target": "secret-target-9"}
    assert api.post("/v1/samples", json={"samples": [secret]}, headers=auth("ops-key")).status_code == 202
    feed = TrainerFeed(redis_client, Keys(), "test")
    assert feed.lease.acquire(wait=False)
    ordinal = int(redis_client.hget(Keys().ids, "s1"))
    assert feed.quarantine([ordinal], ["a"], ["loss is not finite"], step=3) == 1
    assert (
        api.post(
            "/v1/samples", json={"samples": [{**secret, "id": "s2"}]}, headers=auth("ops-key")
        ).status_code
        == 202
    )

    reader = auth("reader-key")
    for path in ("/v1/quarantine", "/v1/weights/samples?order=asc&limit=10", "/v1/weights/samples?ids=s1,s2"):
        r = api.get(path, headers=reader)
        assert r.status_code == 200 and "secret-" not in r.text, (path, r.text)
    listed = api.get("/v1/quarantine", headers=reader).json()["samples"]
    assert [(s["id"], s["reason"], s["sample"]) for s in listed] == [("s1", "loss is not finite", None)]
    assert api.get("/v1/samples/s2", headers=reader).status_code == 403

    admin = api.get("/v1/quarantine", headers=auth("ops-key")).json()["samples"]
    assert admin[0]["sample"]["input"] == "secret-input-7"
    assert api.get("/v1/samples/s2", headers=auth("ops-key")).json()["target"] == "secret-target-9"
