"""HTTP details clients rely on: HEAD on every GET, conditional and range requests on checkpoint files,
the JSON error shape on every error (the framework's own too), and bounded query and path values.

RFC 9110: §9.3.2 (HEAD: the same header fields as GET, no content), §13.1.2 (If-None-Match), §14.2 (a
Range with a unit the server does not understand MUST be ignored), §15.5.17 (416 with Content-Range).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from checkpoint_rows import publish_checkpoint
from fastapi.testclient import TestClient

from store.config import Settings

DATA = bytes(range(256)) * 40  # 10,240 bytes
SAMPLE = {"id": "s1", "source": "a", "input": "1+1=", "target": "2"}


@pytest.fixture
def api(
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
    database_url: str,
    tmp_path: Path,
) -> TestClient:
    """The app on SQLite and on PostgreSQL, with one sample and checkpoint 1 published."""
    client = make_client(make_settings(database_url=database_url))
    publish_checkpoint(database_url, tmp_path / "trainer-data", 1, DATA)
    assert client.post("/v1/samples", json={"samples": [SAMPLE]}).status_code == 202
    return client


def error_of(response: Any, status: int, kind: str | None = None) -> dict[str, Any]:
    """The response's contract error object, after checking status, media type and shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert isinstance(error["detail"], str) and error["detail"]
    if kind is not None:
        assert error["type"] == kind, error
    return error


def without_date(headers: Any) -> dict[str, str]:
    """The headers but those that differ per request: the date and the generated ``X-Request-ID``."""
    return {k: v for k, v in headers.items() if k.lower() not in ("date", "x-request-id")}


# --- HEAD -------------------------------------------------------------------------------------------------


def concrete_get_paths(client: TestClient) -> list[str]:
    """Every GET the app documents, path parameters filled in, and the docs themselves."""
    values = {"version": "1", "sample_id": SAMPLE["id"]}
    paths = ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"]
    schema = client.get("/openapi.json").json()
    for template, operations in schema["paths"].items():
        if "get" not in operations:
            continue
        path = template
        for name, value in values.items():
            path = path.replace("{" + name + "}", value)
        assert "{" not in path, f"no test value for a parameter of {template}"
        paths.append(path)
    return paths


def test_every_get_route_answers_head_with_the_same_status_and_headers_and_no_body(api: TestClient) -> None:
    paths = concrete_get_paths(api)
    assert {"/v1/checkpoints/1/file", "/v1/checkpoints/1", "/openapi.json", "/docs"} <= set(paths)
    for path in [*paths, "/v1/checkpoints/latest/file", "/v1/checkpoints/latest"]:
        got, head = api.get(path), api.head(path)
        assert head.status_code == got.status_code, path
        assert head.content == b"", path
        expected = without_date(got.headers)
        if path == "/readyz" or path == "/metrics" or path == "/v1/stats":
            expected.pop("content-length", None)  # counters may move between the two requests
        for name, value in expected.items():
            assert head.headers.get(name) == value, (path, name)


def test_head_on_the_latest_checkpoint_file_has_etag_length_and_version(api: TestClient) -> None:
    head = api.head("/v1/checkpoints/latest/file")

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(DATA))
    assert head.headers["x-checkpoint-version"] == "1"
    etag = head.headers["etag"]
    assert etag == api.get("/v1/checkpoints/latest/file").headers["etag"]

    again = api.head("/v1/checkpoints/latest/file", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.headers["etag"] == etag
    assert again.headers["x-checkpoint-version"] == "1"


def test_head_on_an_unknown_checkpoint_is_404_without_a_body(api: TestClient) -> None:
    head = api.head("/v1/checkpoints/7/file")
    assert head.status_code == 404
    assert head.content == b""


# --- Range (RFC 9110 §14) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["items=0-10", "lines=1-2", "x", "=0-5"], ids=["items", "lines", "no_eq", "no_unit"]
)
def test_a_range_with_an_unknown_unit_is_ignored_and_the_whole_file_sent(api: TestClient, value: str) -> None:
    response = api.get("/v1/checkpoints/latest/file", headers={"Range": value})

    assert response.status_code == 200
    assert response.content == DATA
    assert "content-range" not in response.headers


def test_a_byte_range_is_still_served_as_206(api: TestClient) -> None:
    response = api.get("/v1/checkpoints/latest/file", headers={"Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == DATA[10:20]
    assert response.headers["content-range"] == f"bytes 10-19/{len(DATA)}"


@pytest.mark.parametrize("value", ["bytes=abc", "bytes=5-2", "bytes=-"], ids=["letters", "backwards", "dash"])
def test_a_malformed_byte_range_is_a_json_error(api: TestClient, value: str) -> None:
    response = api.get("/v1/checkpoints/latest/file", headers={"Range": value})
    if response.status_code == 200:  # RFC 9110 §14.2: a server MAY ignore an invalid ranges-specifier
        assert response.content == DATA
        return
    error_of(response, 400)


def test_an_unsatisfiable_range_is_416_json_with_content_range(api: TestClient) -> None:
    response = api.get("/v1/checkpoints/latest/file", headers={"Range": f"bytes={len(DATA) + 5}-"})
    error_of(response, 416, "RangeNotSatisfiable")
    assert response.headers["content-range"] == f"bytes */{len(DATA)}"


# --- the framework's own errors ---------------------------------------------------------------------------


def test_an_unknown_route_is_a_json_404(api: TestClient) -> None:
    error_of(api.get("/v1/nothing-here"), 404, "NotFound")
    error_of(api.get("/nothing"), 404, "NotFound")


def test_a_wrong_method_is_a_json_405_with_allow(api: TestClient) -> None:
    response = api.delete("/v1/weights")
    error_of(response, 405, "MethodNotAllowed")
    assert "GET" in response.headers["allow"]


# --- bounded query and path values ------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["10000000000000000000000000", "-1", "0", "1001", "abc", "1e3"])
def test_an_out_of_range_checkpoint_limit_is_422_naming_the_field(api: TestClient, limit: str) -> None:
    error = error_of(api.get("/v1/checkpoints", params={"limit": limit}), 422, "ValidationError")
    assert "limit" in error["detail"]


def test_a_checkpoint_limit_in_range_lists_newest_first(
    api: TestClient, database_url: str, tmp_path: Path
) -> None:
    publish_checkpoint(database_url, tmp_path / "trainer-data", 2, b"second")
    assert [c["version"] for c in api.get("/v1/checkpoints", params={"limit": 1000}).json()] == [2, 1]
    assert [c["version"] for c in api.get("/v1/checkpoints", params={"limit": 1}).json()] == [2]


@pytest.mark.parametrize(
    "version", ["99999999999999999999999999", "2147483648", "²", "٣", "-1", "0x1", "1.0"]
)  # fmt: skip
@pytest.mark.parametrize("suffix", ["", "/file"])
def test_a_checkpoint_version_out_of_range_is_a_4xx_never_a_500(
    api: TestClient, version: str, suffix: str
) -> None:
    response = api.get(f"/v1/checkpoints/{version}{suffix}")
    assert response.status_code in (404, 422), response.text
    error_of(response, response.status_code)
