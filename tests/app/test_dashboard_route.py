"""The dashboard's serving side, without a browser: ``GET /`` and its files, and ``GET /v1/weights/history``
(the SQL weight snapshots the page charts). tests/app/test_dashboard.py drives the page itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.routes.dashboard import STATIC_DIR
from store.config import Settings
from store.meta import WeightSnapshot, make_engine

KEYS = "reader-key:read,agent-key:ingest"


def test_the_page_and_its_files_are_served_with_a_policy_that_runs_only_our_own_scripts(
    app_client: TestClient,
) -> None:
    page = app_client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    # every file the page names is served from here: nothing from elsewhere at run time
    names = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    local = [n for n in names if not n.startswith("data:")]
    assert {"static/dashboard.js", "static/vendor/uPlot.iife.min.js", "static/dashboard.css"} <= set(local)
    for name in local:
        assert "://" not in name and not name.startswith("//"), name
        assert app_client.get(f"/{name}").status_code == 200, name
    assert app_client.head("/").status_code == 200
    assert app_client.get("/static/vendor/uPlot.iife.min.js").text.startswith("/*! uPlot v1.6.32")


def test_a_missing_dashboard_file_is_a_json_404_and_paths_cannot_leave_the_static_dir(
    app_client: TestClient,
) -> None:
    for path in ("/static/nope.js", "/static/..%2Froutes%2Fdashboard.py", "/static/../main.py"):
        response = app_client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "NotFound"


def test_the_page_needs_no_key_but_its_data_does(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    api = make_client(make_settings(api_keys=KEYS))
    assert api.get("/").status_code == 200
    assert api.get("/static/dashboard.js").status_code == 200
    assert api.get("/v1/weights/history").status_code == 401
    assert api.get("/v1/weights/history", headers={"Authorization": "Bearer agent-key"}).status_code == 403
    assert api.get("/v1/weights/history", headers={"Authorization": "Bearer reader-key"}).json() == {
        "snapshots": []
    }


def test_the_script_never_writes_html() -> None:
    """Sample content is untrusted: the page's own script writes text only (the browser test shows a sample
    with markup rendered as text; this keeps a later edit from reaching for an HTML sink)."""
    code = "\n".join(
        line
        for line in (STATIC_DIR / "dashboard.js").read_text().splitlines()
        if not line.lstrip().startswith(("*", "//", "/*"))
    )
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink


def test_weight_history_lists_snapshots_newest_first_up_to_limit(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    settings = make_settings()
    client = make_client(settings)  # its lifespan has created the schema
    start = datetime(2026, 1, 1, tzinfo=UTC)
    engine = make_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session, session.begin():
            for i, step in enumerate((10, 20, 30)):
                sources = {"a": 0.5 + 0.1 * i, "b": 0.5 - 0.1 * i}
                summary = {"count": 4, "effective_fraction": 1.0 - 0.25 * i, "mean": 1.0}
                created = start + timedelta(minutes=i)
                session.add(WeightSnapshot(step=step, sources=sources, summary=summary, created_at=created))
    finally:
        engine.dispose()

    body = client.get("/v1/weights/history").json()
    assert [s["step"] for s in body["snapshots"]] == [30, 20, 10]
    newest = body["snapshots"][0]
    assert newest == {
        "step": 30,
        "created_at": "2026-01-01T00:02:00+00:00",
        "sources": {"a": 0.7, "b": 0.3},
        "summary": {"count": 4, "effective_fraction": 0.5, "mean": 1.0},
    }
    assert [s["step"] for s in client.get("/v1/weights/history?limit=2").json()["snapshots"]] == [30, 20]
    for bad in ("0", "1001", "x"):
        error = client.get(f"/v1/weights/history?limit={bad}")
        assert error.status_code == 422
        assert error.json()["error"]["type"] == "ValidationError"
