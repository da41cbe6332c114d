"""Polling a pinned checkpoint version costs no database round trip once its row was read (a version's row
never changes), while a version retention deleted is a 404 at once (its file is checked on every use)."""
# the queries are counted with SQLAlchemy's own event hook on the app's real engine

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from checkpoint_rows import publish_checkpoint
from fastapi.testclient import TestClient
from sqlalchemy import delete, event
from sqlalchemy.orm import Session

from store.config import Settings
from store.meta import Checkpoint, make_engine


def test_a_pinned_version_answers_304_without_the_database_and_404_once_deleted(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    settings = make_settings()
    client = make_client(settings, raise_server_exceptions=False)
    row = publish_checkpoint(settings.resolved_database_url, settings.data_dir, 1, b"weights v1")
    first = client.get("/v1/checkpoints/1/file")
    assert first.status_code == 200 and first.content == b"weights v1"
    etag = first.headers["etag"]

    queries: list[str] = []
    event.listen(client.app.state.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    for _ in range(5):
        polled = client.get("/v1/checkpoints/1/file", headers={"If-None-Match": etag})
        assert (polled.status_code, polled.headers["x-checkpoint-version"]) == (304, "1")
    assert queries == []  # the pinned version's row came from the process's cache
    assert client.get("/v1/checkpoints/latest/file", headers={"If-None-Match": etag}).status_code == 304
    assert len(queries) == 1  # latest may change: the database is asked each time

    engine = make_engine(settings.resolved_database_url)
    with Session(engine) as session, session.begin():  # retention: the row, then the file
        session.execute(delete(Checkpoint).where(Checkpoint.version == 1))
    engine.dispose()
    Path(row.path).unlink()
    gone = client.get("/v1/checkpoints/1/file", headers={"If-None-Match": etag})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFound"
