"""Migrations: ``datadiet migrate`` upgrades the schema with one log line (Alembic's own INFO chatter
silenced); with ``DATADIET_AUTO_MIGRATE=false`` the API and the trainer leave the schema alone and refuse
to start on one that is behind."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from store.config import Settings
from store.meta import SchemaNotCurrent, make_engine, schema_revisions
from store.processes import datadiet_env

EXIT_CONFIG = 78


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_datadiet_migrate_upgrades_once_and_says_so_in_one_line(tmp_path: Path) -> None:
    env = datadiet_env(data_dir=str(tmp_path / "data"))
    migrate = [sys.executable, "-m", "app.cli", "migrate"]

    first, second = run(migrate, env, tmp_path), run(migrate, env, tmp_path)

    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines()[-1].endswith(
        "store.meta database schema upgraded from empty to revision 0001"
    )
    assert len(first.stderr.splitlines()) == 1, first.stderr  # no "INFO [alembic.runtime...]" lines
    assert second.returncode == 0 and second.stderr.strip().endswith("database schema at revision 0001")
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'meta.db'}")
    try:
        assert schema_revisions(engine) == ("0001", "0001")
    finally:
        engine.dispose()


def test_datadiet_migrate_on_an_unreachable_database_is_one_line_and_exit_1(tmp_path: Path) -> None:
    env = datadiet_env(data_dir=str(tmp_path), database_url="postgresql://u:secret@127.0.0.1:1/none")
    done = run([sys.executable, "-m", "app.cli", "migrate"], env, tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(
        "datadiet: cannot migrate the database at postgresql://u:***@127.0.0.1:1/none"
    )
    assert "secret" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_api_without_auto_migrate_refuses_a_schema_behind_then_starts_once_migrated(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(auto_migrate=False)
    with pytest.raises(SchemaNotCurrent, match="datadiet migrate"), TestClient(create_app(settings)):
        pass
    engine = make_engine(settings.resolved_database_url)
    try:
        assert schema_revisions(engine)[0] is None  # it changed nothing

        env = datadiet_env(data_dir=str(settings.data_dir))
        assert run([sys.executable, "-m", "app.cli", "migrate"], env, tmp_path).returncode == 0

        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").status_code == 200
    finally:
        engine.dispose()


def test_the_trainer_without_auto_migrate_exits_78_on_an_empty_database(
    redis_url: str, tmp_path: Path
) -> None:
    env = datadiet_env(redis_url=redis_url, data_dir=str(tmp_path / "data"), auto_migrate="false")
    done = run([sys.executable, "-m", "trainer"], env, tmp_path)
    assert done.returncode == EXIT_CONFIG, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "run `datadiet migrate` first" in lines[0], done.stderr
