"""Logs: ``DATADIET_LOG_FORMAT=json`` gives one JSON object a line, the API's request lines (uvicorn's access
log, error lines) carry the request's id, and ``X-Request-ID`` is echoed (a malformed one replaced)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_correlation_id import correlation_id
from fastapi.testclient import TestClient

from app.logs import setup_logging
from store.processes import RedisServer, datadiet_env, free_port, spawn, stop_process_group, wait_until_ready

GENERATED = re.compile(r"[0-9a-f]{32}")  # a uuid4's hex


def test_a_well_formed_request_id_is_echoed(app_client: TestClient) -> None:
    response = app_client.get("/healthz", headers={"X-Request-ID": "agent-7:run.42_b"})
    assert response.headers["x-request-id"] == "agent-7:run.42_b"


def test_a_request_without_an_id_gets_a_new_one_on_every_answer(app_client: TestClient) -> None:
    ids = [app_client.get("/healthz").headers["x-request-id"] for _ in range(2)]
    ids.append(app_client.get("/v1/samples/nope").headers["x-request-id"])  # an error answer too
    assert all(GENERATED.fullmatch(i) for i in ids)
    assert len(set(ids)) == 3


@pytest.mark.parametrize("bad", ["has space", 'quote"d', "x" * 129, "tab\there", "ümlaut"])
def test_a_malformed_request_id_is_replaced(app_client: TestClient, bad: str) -> None:
    response = app_client.get("/healthz", headers={"X-Request-ID": bad.encode()})
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["x-request-id"])


def test_text_lines_name_the_request_only_when_there_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text")
    try:
        log = logging.getLogger("datadiet.test")
        log.warning("outside a request")
        token = correlation_id.set("req-1")
        try:
            log.warning("inside a request")
        finally:
            correlation_id.reset(token)
        lines = capsys.readouterr().err.splitlines()
        assert re.fullmatch(r"\d\d:\d\d:\d\d datadiet\.test outside a request", lines[-2])
        assert re.fullmatch(r"\d\d:\d\d:\d\d datadiet\.test \[req-1\] inside a request", lines[-1])
    finally:
        setup_logging("text")  # a handler on this test's stderr capture must not outlive it


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` as JSON (the test fails on the first that is not)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{path.name}:{n} is not JSON: {line!r}")
    return out


def test_json_logs_of_datadiet_serve_carry_the_request_id(
    dedicated_redis: RedisServer, tmp_path: Path
) -> None:
    """A real ``datadiet serve`` in JSON: every line parses, uvicorn's access line and the 503's warning
    carry the id the request came with, and the start-up lines (no request) carry none."""
    port, log = free_port(), tmp_path / "api.log"
    env = datadiet_env(redis_url=dedicated_redis.url, data_dir=str(tmp_path / "data"), log_format="json")
    argv = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(argv, log=log, env=env, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, proc, log, timeout=30)
        ok = httpx.get(f"{base}/v1/stats", headers={"X-Request-ID": "stats-ok-1"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "stats-ok-1"
        dedicated_redis.stop()  # the buffer goes away: the next read is a 503, logged as a warning
        down = httpx.get(f"{base}/v1/stats", headers={"X-Request-ID": "stats-down-2"})
        assert down.status_code == 503 and down.headers["x-request-id"] == "stats-down-2"
    finally:
        stop_process_group(proc)

    records = _json_lines(log)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert not any("\\u001b" in json.dumps(r) for r in records)  # no terminal colours (uvicorn's)
    access = [r for r in records if r["logger"] == "uvicorn.access" and "/v1/stats" in r["message"]]
    assert [(r["request_id"], " 200" in r["message"]) for r in access[:1]] == [("stats-ok-1", True)]
    by_request = {r.get("request_id") for r in records}
    assert "stats-down-2" in by_request
    warning = [r for r in records if r.get("request_id") == "stats-down-2" and r["level"] == "WARNING"]
    assert warning and warning[0]["logger"].startswith("app."), records
    started = [r for r in records if "startup complete" in r["message"]]
    assert started and "request_id" not in started[0]
