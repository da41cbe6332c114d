"""``store.meta``: Alembic migrations and the typed models, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import store.meta
from store.meta import (
    Checkpoint,
    ValidationVersion,
    latest_checkpoint,
    make_engine,
    migrate,
    next_checkpoint_version,
    record_validation_version,
)

TABLES = {"checkpoints", "validation_versions", "weight_snapshots", "alembic_version"}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on an empty database (SQLite or PostgreSQL), not migrated yet."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def head_revision() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store.meta.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def migrate_in_new_process(url: str) -> list[str]:
    """Migrate as a starting worker does; returns the revision it then sees."""
    engine = make_engine(url)
    try:
        migrate(engine)
        return current_revision(engine)
    finally:
        engine.dispose()


def checkpoint(version: int, **fields: object) -> Checkpoint:
    values: dict[str, object] = {
        "version": version,
        "step": 250 * version,
        "sha256": f"{version:064x}",
        "size": 1234,
        "path": f"/data/checkpoints/v{version}.safetensors",
        "model_kind": "tiny-gpt",
        "config": {"d_model": 64, "n_layer": 2},
        "metrics": {"val_loss": 1.25},
        **fields,
    }
    return Checkpoint(**values)


def test_migrate_creates_the_tables_at_the_head_revision(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) & TABLES == set()

    migrate(engine)

    assert set(inspect(engine).get_table_names()) >= TABLES
    assert current_revision(engine) == [head_revision()]


def test_migrating_twice_is_a_no_op(engine: Engine) -> None:
    migrate(engine)
    with Session(engine) as session, session.begin():
        session.add(checkpoint(1))

    migrate(engine)

    assert current_revision(engine) == [head_revision()]
    with Session(engine) as session:
        assert [c.version for c in session.scalars(select(Checkpoint))] == [1]


def test_checkpoint_round_trips_with_a_timezone_aware_created_at(engine: Engine) -> None:
    migrate(engine)
    before = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        session.add(checkpoint(1))
        session.add(
            checkpoint(2, created_at=datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))))
        )

    with Session(engine) as session:
        first, second = session.get(Checkpoint, 1), session.get(Checkpoint, 2)
        assert first is not None and second is not None
        assert first.created_at.tzinfo is not None
        assert before - timedelta(seconds=1) <= first.created_at <= datetime.now(UTC)
        assert second.created_at == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)  # the same instant
        assert first.detail() == {
            "version": 1,
            "step": 250,
            "created_at": first.created_at.isoformat(),
            "sha256": f"{1:064x}",
            "size": 1234,
            "metrics": {"val_loss": 1.25},
            "model": "tiny-gpt",
            "config": {"d_model": 64, "n_layer": 2},
        }


def test_latest_checkpoint_is_the_highest_version(engine: Engine) -> None:
    migrate(engine)
    with Session(engine) as session:
        assert latest_checkpoint(session) is None
        assert next_checkpoint_version(session) == 1
        session.add_all([checkpoint(2), checkpoint(1)])
        session.commit()

        latest = latest_checkpoint(session)
        assert latest is not None and latest.version == 2
        assert next_checkpoint_version(session) == 3


def test_recording_a_validation_version_twice_keeps_one_row(engine: Engine) -> None:
    migrate(engine)

    record_validation_version(engine, version=1, count=3, mode="replace")
    record_validation_version(engine, version=1, count=3, mode="replace")
    record_validation_version(engine, version=2, count=5, mode="append")

    with Session(engine) as session:
        rows = session.scalars(select(ValidationVersion).order_by(ValidationVersion.version)).all()
        assert [(r.version, r.count, r.mode) for r in rows] == [(1, 3, "replace"), (2, 5, "append")]
        assert all(r.created_at.tzinfo is not None for r in rows)


def test_processes_starting_together_on_a_fresh_database_all_migrate(database_url: str) -> None:
    """API workers and the trainer start at once on first boot: one migrates, the others wait and agree."""
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        revisions = list(pool.map(migrate_in_new_process, [database_url] * 4))

    assert revisions == [[head_revision()]] * 4
