"""Security: the API docs need a key when keys are configured, a key spec without a usable key is a
start-up error (never "auth off"), and request bodies must be ``application/json`` (415 otherwise), so a
web page cannot post samples or replace the validation set with a "simple" cross-site request
(text/plain, form encodings; the Fetch standard's CORS-safelisted content types).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from app.auth import parse_keys
from app.main import create_app
from store.config import Settings

KEYS = "agent-key:ingest,reader-key:read,ops-key:admin"
SAMPLE = {"source": "a", "input": "1+1=", "target": "2"}
BODY = orjson.dumps({"samples": [SAMPLE]})
DOC_PATHS = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind, error
    return error


# --- the docs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOC_PATHS)
def test_docs_and_schema_need_a_key_when_keys_are_configured(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient], path: str
) -> None:
    api = make_client(make_settings(api_keys=KEYS))

    error_of(api.get(path), 401, "Unauthorized")
    assert api.head(path).status_code == 401
    error_of(api.get(path, headers=auth("wrong")), 401, "Unauthorized")
    assert api.get(path, headers=auth("reader-key")).status_code == 200
    assert api.get(path, headers=auth("ops-key")).status_code == 200


def test_the_schema_with_a_key_is_the_apps_schema_and_hides_the_docs_routes(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    api = make_client(make_settings(api_keys=KEYS))
    schema = api.get("/openapi.json", headers=auth("reader-key")).json()
    assert "/v1/samples" in schema["paths"]
    assert not any(p.startswith(("/docs", "/redoc", "/openapi")) for p in schema["paths"])
    assert "/openapi.json" in api.get("/docs", headers=auth("reader-key")).text


@pytest.mark.parametrize("path", DOC_PATHS)
def test_docs_are_open_without_keys(app_client: TestClient, path: str) -> None:
    assert app_client.get(path).status_code == 200


# --- the key spec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [" , ", ",", " ", "\t", ",,,", " ,\n, "])
def test_a_key_spec_without_a_usable_key_is_a_start_up_error(
    spec: str, make_settings: Callable[..., Settings]
) -> None:
    with pytest.raises(ValueError, match="no key"):
        parse_keys(spec)
    with pytest.raises(ValueError, match="no key"):
        create_app(make_settings(api_keys=spec))


@pytest.mark.parametrize("spec", [None, ""])
def test_an_unset_or_empty_key_spec_means_no_auth(spec: str | None) -> None:
    assert parse_keys(spec) == {}


def test_blank_entries_beside_a_usable_key_are_skipped() -> None:
    assert parse_keys("a:read, ,b:admin,") == {"a": {"read"}, "b": {"admin"}}


# --- content type -----------------------------------------------------------------------------------------


NOT_JSON = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
            "application/jsonx", "text/json", "application/json; charset=latin-1", "*/*"]  # fmt: skip


@pytest.mark.parametrize("content_type", NOT_JSON)
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/samples"), ("PUT", "/v1/validation"),
                                              ("POST", "/v1/validation")])  # fmt: skip
def test_a_body_that_is_not_declared_json_is_415_and_stores_nothing(
    app_client: TestClient, method: str, path: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}

    response = app_client.request(method, path, content=BODY, headers=headers)

    error = error_of(response, 415, "UnsupportedMediaType")
    assert "application/json" in error["detail"]
    stats = app_client.get("/v1/stats").json()
    assert stats["buffer"]["ingested"] == 0
    assert stats["validation"]["count"] == 0


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"]
)
def test_json_with_or_without_a_utf8_charset_is_accepted(app_client: TestClient, content_type: str) -> None:
    response = app_client.post("/v1/samples", content=BODY, headers={"Content-Type": content_type})
    assert response.status_code == 202, response.text


def test_the_content_type_is_checked_after_the_key(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    api = make_client(make_settings(api_keys=KEYS))
    error_of(
        api.post("/v1/samples", content=BODY, headers={"Content-Type": "text/plain"}), 401, "Unauthorized"
    )
    response = api.post(
        "/v1/samples", content=BODY, headers={"Content-Type": "text/plain", **auth("agent-key")}
    )
    error_of(response, 415, "UnsupportedMediaType")
