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


def test_malformed_key_spec_is_rejected_naming_the_entry() -> None:
    assert parse_keys("a:ingest+read, b:admin") == {"a": {"ingest", "read"}, "b": {"admin"}}
    with pytest.raises(ValueError, match="'b:write'"):
        parse_keys("a:read,b:write")
