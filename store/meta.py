"""SQL metadata: published checkpoints, validation-set versions and weight snapshots.

SQLAlchemy 2.0 typed models; the schema is created and upgraded by Alembic (``store/migrations``) through
``migrate()``. SQLite by default, PostgreSQL through ``DATADIET_DATABASE_URL``.
"""

from __future__ import annotations

import fcntl
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, String, create_engine, event, select
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored as UTC. SQLite keeps no offset: values are converted to UTC on
    the way in and read back as UTC (naive input is taken as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Checkpoint(Base):
    """One published, immutable model version: the file at ``path`` with this ``sha256``."""

    __tablename__ = "checkpoints"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    step: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(1024))
    model_kind: Mapped[str] = mapped_column(String(256))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "step": self.step,
            "created_at": _iso(self.created_at),
            "sha256": self.sha256,
            "size": self.size,
            "metrics": self.metrics,
        }

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "model": self.model_kind, "config": self.config}


class ValidationVersion(Base):
    """A version of the trusted validation set (its payloads live in Redis)."""

    __tablename__ = "validation_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(8))  # "replace" or "append"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WeightSnapshot(Base):
    """The trainer's source weights and weight summary at one step (the weight history)."""

    __tablename__ = "weight_snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    step: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sources: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def _iso(ts: datetime) -> str:
    if ts.tzinfo is None:  # SQLite returns naive datetimes; we only ever store UTC
        ts = ts.replace(tzinfo=UTC)
    return ts.isoformat()


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (the driver we install)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


# libpq settings that make a PostgreSQL connection notice a vanished server (a partition, a dead host) in
# about 30 s instead of TCP's ~15 minutes of retransmissions; a URL that sets one of them wins
TCP_LIVENESS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                "tcp_user_timeout": 30_000}  # fmt: skip


def make_engine(
    url: str,
    *,
    connect_timeout: float = 10.0,
    pool_timeout: float = 30.0,
    statement_timeout: float | None = None,
) -> Engine:
    """The engine for ``url``: SQLite (WAL) or PostgreSQL through psycopg 3. Times are in seconds.

    ``connect_timeout``: to open a PostgreSQL connection (libpq ``connect_timeout``: whole seconds, and
    psycopg, like libpq, waits at least 2). ``pool_timeout``: to wait for a free pooled connection
    (SQLAlchemy ``QueuePool``). ``statement_timeout``: how long one statement may run before the server
    cancels it (PostgreSQL ``statement_timeout``; SQLite: how long to wait for a lock), None for no
    limit. The API gives short ones (``DATADIET_DATABASE_TIMEOUT``); the trainer and migrations keep the
    defaults, with no statement limit, since their work may legitimately run long.
    """
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = make_url(url).database or ""
        in_memory = path in ("", ":memory:")
        if not in_memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        busy = 30.0 if statement_timeout is None else statement_timeout
        # a file gets a QueuePool; memory a SingletonThreadPool, which has no checkout timeout
        pooled = {} if in_memory else {"pool_timeout": pool_timeout}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy}, **pooled)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    postgres = make_url(url).get_backend_name() == "postgresql"
    connect_args: dict[str, Any] = {}
    if postgres:
        given = make_url(url).query
        connect_args = {k: v for k, v in TCP_LIVENESS.items() if k not in given}
        if "connect_timeout" not in given:
            connect_args["connect_timeout"] = max(2, math.ceil(connect_timeout))
    engine = create_engine(url, pool_pre_ping=True, pool_timeout=pool_timeout, connect_args=connect_args)
    if statement_timeout is not None and postgres:
        milliseconds = max(1, round(statement_timeout * 1000))

        @event.listens_for(engine, "connect")
        def _statement_timeout(conn: Any, _record: Any) -> None:
            with conn.cursor() as cur:
                cur.execute(f"SET statement_timeout = {milliseconds}")
            conn.commit()

    return engine


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations of one SQLite file across processes (API workers and the trainer start at
    once); PostgreSQL does the same with an advisory lock in ``migrations/env.py``."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def migrate(engine: Engine) -> str:
    """Bring the schema to the newest Alembic revision (a no-op when it is there already); returns that
    revision.

    Logs one line: the revision the schema is at, or the one it was upgraded from and to. Alembic's own
    INFO lines (its plugins at import, "Context impl", "Will assume transactional DDL", each revision run)
    are silenced: its logger is set to WARNING before Alembic is imported.
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _sqlite_migration_lock(engine), engine.begin() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        after = MigrationContext.configure(conn).get_current_revision() or ""
    if before == after:
        log.info("database schema at revision %s", after)
    else:
        log.info("database schema upgraded from %s to revision %s", before or "empty", after)
    return after


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """``(current, head)``: the revision the database's schema is at (None for an empty database) and the
    newest one this code knows (``store/migrations/versions``). Raises SQLAlchemy's ``OperationalError``
    when the database does not answer."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head() or ""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision(), head


class SchemaNotCurrent(RuntimeError):
    """The database's schema is not at this code's revision and this process may not migrate it
    (``DATADIET_AUTO_MIGRATE=false``): run ``datadiet migrate`` first."""


def check_schema(engine: Engine) -> str:
    """The schema's revision when it is the newest this code knows; else ``SchemaNotCurrent`` naming both
    revisions and the command that fixes it."""
    current, head = schema_revisions(engine)
    if current != head:
        raise SchemaNotCurrent(
            f"the database schema is at revision {current or 'none (empty database)'}, this code needs "
            f"{head}, and DATADIET_AUTO_MIGRATE is off: run `datadiet migrate` first"
        )
    return head


def latest_checkpoint(session: Session) -> Checkpoint | None:
    return session.scalars(select(Checkpoint).order_by(Checkpoint.version.desc()).limit(1)).first()


def next_checkpoint_version(session: Session) -> int:
    latest = latest_checkpoint(session)
    return 1 if latest is None else latest.version + 1


def record_validation_version(engine: Engine, version: int, count: int, mode: str) -> None:
    with Session(engine) as session, session.begin():
        session.merge(ValidationVersion(version=version, count=count, mode=mode))
