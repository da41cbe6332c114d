"""Everything the trainer makes visible to others, in one place (rank 0's work in data-parallel runs):
per-sample and per-source weights and status in Redis, checkpoints (file, resumable state, SQL row) and
weight snapshots in SQL, and the progress line on the terminal.

Every Redis write is fenced by the trainer lease (store.lease). A checkpoint is written in two halves so a
database outage never loses one: ``write_checkpoint`` (version reserved under the lease, file and state on
disk) and ``register_pending`` (the SQL row, retried until the database answers; files left unregistered
by a stopped trainer are adopted at the next start, ``adopt_unregistered``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.checkpoints import CHECKPOINT_DIR, CHECKPOINT_SUFFIX, checkpoint_path, sha256_file
from store.feed import TrainerFeed
from store.histogram import HIST_EDGES
from store.meta import Checkpoint, WeightSnapshot, latest_checkpoint
from trainer.checkpoint import CheckpointError, read_metadata, save_checkpoint
from trainer.models.base import TrainModel
from trainer.state import TrainerState, capture, prune_states, save_state, state_paths
from trainer.table import WeightTable

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger("datadiet.trainer")

EFFECTIVE = 0.1  # a sample with weight >= 0.1 counts as used (CONTRACT.md, "effective fraction")


def weights_document(table: WeightTable, step: int, method: str) -> dict[str, Any]:
    """The document ``GET /v1/weights`` serves."""
    alive = table.alive
    w = table.weight[alive].astype(np.float64)
    names, name_of = table.source_names()  # a source's cohorts are reported together, by name
    src = name_of[table.source[alive].astype(np.int64)] if len(names) else np.zeros(0, np.int64)
    n_src = len(names)
    mass = np.bincount(src, weights=w, minlength=n_src)
    count = np.bincount(src, minlength=n_src)
    total = float(mass.sum())
    top = max(float(w.max()) if len(w) else 0.0, HIST_EDGES[-1]) + 1e-9
    counts, edges = np.histogram(w, bins=[*HIST_EDGES, top])
    present = [i for i in range(n_src) if count[i] > 0]
    return {
        "step": step,
        "updated_at": datetime.now(UTC).isoformat(),
        "method": method,
        "sources": {names[i]: float(mass[i] / total) if total else 0.0 for i in present},
        "source_stats": {
            names[i]: {"count": int(count[i]), "mean_weight": float(mass[i] / count[i])} for i in present
        },
        "summary": {
            "count": len(w),
            "effective_fraction": float((w >= EFFECTIVE).mean()) if len(w) else 1.0,
            "mean": float(w.mean()) if len(w) else 1.0,
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        },
    }


class Publisher:
    def __init__(
        self,
        feed: TrainerFeed,
        engine: Engine,
        data_dir: Path,
        publish_every_s: float,
        tolerance: float = 0.01,
        max_rows: int = 100_000,
    ) -> None:
        self.feed = feed
        self.tolerance = tolerance  # relative change of a sample's weight that is worth rewriting
        self.max_rows = max_rows  # per-sample weights written a publish at most
        self.last_written = 0  # per-sample weights the last publish wrote
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.min_interval = publish_every_s
        self.interval = publish_every_s
        self.last_publish = 0.0
        self.last_doc: dict[str, Any] | None = None
        self.known_version = 0  # the newest checkpoint version the database is known to hold
        # checkpoints written whose SQL rows are not in yet (the database was unavailable): row values and
        # the weight snapshot, oldest first
        self.pending: list[tuple[dict[str, Any], dict[str, Any] | None]] = []

    def due(self) -> bool:
        return time.monotonic() - self.last_publish >= self.interval

    def publish_weights(self, table: WeightTable, step: int, method: str, status: dict[str, Any]) -> None:
        """Publish the weights document, and the per-sample weights that moved since they were last
        published, under the lease: the write is proportional to what changed, not to the buffer.

        A live row is rewritten when it was never published by this process, or when its weight moved by
        more than ``tolerance`` relative to the larger of the two (|w - p| > tol * max(|w|, |p|)); so a
        weight read from the API is within ``tolerance`` of the trainer's, and a run that barely moves
        its weights writes almost nothing. At most ``max_rows`` rows are written a publish, the largest
        relative moves first (a restarted trainer's first publishes of a large buffer are spread out:
        rewriting a zset member costs Redis ~2-10 us). Raises LeaseLost and Redis errors (nothing is
        marked published then: the next publish rewrites it)."""
        t0 = time.monotonic()
        doc = weights_document(table, step, method)
        w, published = table.weight, table.published
        with np.errstate(invalid="ignore"):  # NaN (never published) compares False, and is taken below
            moved = np.abs(w - published) > self.tolerance * np.maximum(np.abs(w), np.abs(published))
        rows = np.flatnonzero(table.alive & (moved | np.isnan(published)))
        if len(rows) > self.max_rows:  # the largest moves first; the rest wait for the next publish
            p = published[rows].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                change = np.nan_to_num(np.abs(w[rows] - p) / np.abs(p), nan=np.inf)
            rows = np.sort(rows[np.argpartition(-change, self.max_rows)[: self.max_rows]])
        self.feed.publish_weights(doc, table.ordinal[rows], w[rows])
        published[rows] = w[rows]
        self.last_written = len(rows)
        self.feed.set_status(
            step=step,
            updated_at=doc["updated_at"],
            effective_fraction=doc["summary"]["effective_fraction"],
            live=doc["summary"]["count"],
            table_evicted=table.evicted,
            weights_written=len(rows),
            publish_s=round(time.monotonic() - t0, 4),
            **status,
        )
        took = time.monotonic() - t0
        # at a million samples a full publish takes a while: never spend more than ~10% of the time on it
        self.interval = max(self.min_interval, 10 * took)
        self.last_publish = time.monotonic()
        self.last_doc = doc

    def write_checkpoint(
        self, model: TrainModel, state: TrainerState, metrics: dict[str, Any], settings: dict[str, Any]
    ) -> dict[str, Any]:
        """Write a checkpoint's file and resumable state; returns its SQL row's values, queued for
        ``register_pending`` (the row is what makes it visible).

        The version is reserved in Redis under the trainer lease before the file is written, and the file
        never replaces one already there: two trainers can never write, or advertise, one version twice.
        Raises LeaseLost (store.lease) when another trainer holds the lease, and Redis errors."""
        floor = max(self.known_version, newest_version_on_disk(self.data_dir))
        while True:
            version = self.feed.reserve_checkpoint_version(floor)
            path = checkpoint_path(self.data_dir, version)
            meta = {"step": state.step, "version": version, "settings": settings, "metrics": metrics}
            if path.exists():  # a version some earlier writer took without Redis knowing
                log.warning("checkpoint v%d exists already: reserving another version", version)
                floor = version
                continue
            # the state first: a checkpoint file on disk always has its state (a kill between the two
            # leaves a state file without a model, which is never resumed from and is pruned later)
            save_state(self.data_dir, version, state)
            try:
                sha, size = save_checkpoint(path, model, meta, replace=False)
                break
            except FileExistsError:
                log.warning("checkpoint v%d appeared while it was written: reserving another", version)
                floor = version
        values = {
            "version": version,
            "step": state.step,
            "sha256": sha,
            "size": size,
            "path": str(path.resolve()),
            "model_kind": model.kind,
            "config": model.config,
            "metrics": metrics,
        }
        doc = self.last_doc
        snapshot = {"step": state.step, "sources": doc["sources"], "summary": doc["summary"]} if doc else None
        self.pending.append((values, snapshot))
        return values

    def register_pending(self) -> int:
        """Insert the SQL rows of checkpoints written since the database last answered (oldest first);
        returns how many. Raises the database's errors (the rows stay queued)."""
        done = 0
        while self.pending:
            values, snapshot = self.pending[0]
            with Session(self.engine) as session, session.begin():
                if session.get(Checkpoint, values["version"]) is None:
                    session.add(Checkpoint(**values))
                if snapshot is not None:
                    session.add(WeightSnapshot(**snapshot))
            self.pending.pop(0)
            self.known_version = max(self.known_version, values["version"])
            prune_states(self.data_dir, values["version"])
            done += 1
        return done

    def prune(self, keep: int, keep_snapshots: int, in_use: set[int]) -> list[int]:
        """Retention: delete checkpoints older than the newest ``keep`` (their SQL row first, then the
        file), except those ``in_use`` (a download is streaming them or may still resume them: store/feed.py
        ``checkpoints_in_use``); keep the newest ``keep_snapshots`` weight snapshots. Returns the versions
        deleted. Raises the database's errors. Never deletes the newest checkpoint."""
        with Session(self.engine) as session, session.begin():
            versions = session.scalars(select(Checkpoint.version).order_by(Checkpoint.version.desc())).all()
            doomed = [v for v in versions[max(keep, 1) :] if v not in in_use]
            rows = session.scalars(select(Checkpoint).where(Checkpoint.version.in_(doomed))).all()
            paths = [Path(r.path) for r in rows]
            if doomed:
                session.execute(delete(Checkpoint).where(Checkpoint.version.in_(doomed)))
            cutoff = session.scalars(
                select(WeightSnapshot.id).order_by(WeightSnapshot.id.desc()).offset(keep_snapshots).limit(1)
            ).first()
            if cutoff is not None:
                session.execute(delete(WeightSnapshot).where(WeightSnapshot.id <= cutoff))
        for path in paths:  # the rows are gone: nobody is sent to these files any more
            path.unlink(missing_ok=True)
        if doomed:
            log.info("retention: deleted checkpoints %s (keeping the newest %d)", doomed, keep)
        return doomed

    def refresh_known_version(self) -> int:
        """The newest checkpoint version in the database (raises its errors)."""
        with Session(self.engine) as session:
            row = latest_checkpoint(session)
        self.known_version = max(self.known_version, row.version if row else 0)
        return self.known_version

    def adopt_unregistered(self) -> int:
        """Register checkpoint files on disk that are newer than the database's newest row (written while
        the database was unavailable, then the trainer stopped); returns how many. Raises its errors."""
        with Session(self.engine) as session:
            row = latest_checkpoint(session)
        newest = row.version if row else 0
        adopted = 0
        for version, path in sorted(checkpoint_files(self.data_dir).items()):
            if version <= newest:
                continue
            if not all(f.exists() for f in state_paths(self.data_dir, version)):
                log.warning("not registering %s: its trainer state is missing", path)
                continue
            try:
                meta = read_metadata(path)
                values = {
                    "version": version,
                    "step": int(meta["datadiet.step"]),
                    "sha256": sha256_file(path),
                    "size": path.stat().st_size,
                    "path": str(path.resolve()),
                    "model_kind": meta["datadiet.kind"],
                    "config": json.loads(meta["datadiet.config"]),
                    "metrics": json.loads(meta.get("datadiet.metrics", "{}")),
                }
            except (CheckpointError, OSError, ValueError, KeyError) as e:
                log.warning("not registering %s: %s", path, e)
                continue
            self.pending.append((values, None))
            adopted += 1
        if adopted:
            log.warning("registering %d checkpoint(s) written while the database was unavailable", adopted)
        self.register_pending()
        return adopted


def checkpoint_files(data_dir: Path) -> dict[int, Path]:
    """Published checkpoint files under ``data_dir`` by version (temp files are not)."""
    out = {}
    for f in (Path(data_dir) / CHECKPOINT_DIR).glob(f"v*{CHECKPOINT_SUFFIX}"):
        digits = f.name[1 : -len(CHECKPOINT_SUFFIX)]
        if digits.isdigit():
            out[int(digits)] = f
    return out


def newest_version_on_disk(data_dir: Path) -> int:
    return max(checkpoint_files(data_dir), default=0)


# --- the trainer's rank-0 work, in one place --------------------------------------------------------


def checkpoint(t: Trainer) -> bool:
    """Publish weights and write a checkpoint; whether it was written. Redis unavailable: not now
    (``checkpoint_due`` retries it); database unavailable: written, its row registered later."""
    t.redis.attempt(lambda: t.intake.read_evictions(t.table))
    t.table.compact()  # rows of evicted samples go; the cache is keyed by ordinal, not row
    t.sampler.reweight(t.table, t.learner.weighting.weights(t.table, t.step))
    t.redis.attempt(t.publish)
    t.db.attempt(t.publisher.refresh_known_version)
    val = t.validation.full_loss(t.learner.model)
    metrics = {
        "val_loss": None if math.isnan(val) else val,
        "train_loss": _finite(t.learner.train_loss),
        "effective_fraction": (t.publisher.last_doc or {}).get("summary", {}).get("effective_fraction"),
        "live_samples": t.table.live,
        "validation_version": t.validation.version,
        "quarantined": t.quarantine.count,
    }
    settings = t.settings.model_dump(mode="json", exclude={"api_keys", "redis_url", "database_url"})
    state = capture(t)
    ok, values = t.redis.attempt(
        lambda: t.publisher.write_checkpoint(t.learner.model, state, metrics, settings)
    )
    if not ok or values is None:
        t.checkpoint_due = True  # no version without Redis (it is reserved under the lease)
        return False
    t.checkpoint_due = False
    t.checkpointed_step = t.step
    t.redis.attempt(t.intake.ack)  # the saved table holds them now
    registered, _ = t.db.attempt(t.publisher.register_pending)
    # retention, only when both answer: without Redis, which checkpoints are in use is unknown
    ok, in_use = t.redis.attempt(lambda: t.feed.checkpoints_in_use(time.time()))
    if registered and ok and in_use is not None:
        s = t.settings
        t.db.attempt(lambda: t.publisher.prune(s.keep_checkpoints, s.keep_weight_snapshots, in_use))
    log.info(
        "published checkpoint v%d at step %d (val_loss %s)%s",
        values["version"],
        t.step,
        metrics["val_loss"],
        "" if registered else "; its database row waits for the database",
    )
    return True


def status(t: Trainer) -> dict[str, Any]:
    """The trainer's status hash fields (besides those ``publish_weights`` sets): ``state`` is
    ``training``, ``training_without_validation_set`` (it trains uniformly until PUT /v1/validation),
    ``idle`` (nothing new to learn: trainer/idle.py) or ``waiting_for_samples``; ``idle`` 1/0; freshness
    (seconds from POST to first training use, over the last ~10,000 samples: trainer/metrics.py)."""
    return {
        "steps_per_s": round(t.rate, 3),
        "val_loss": _finite(t.validation.current_loss) or "",
        "train_loss": _finite(t.learner.train_loss) or "",
        "method": t.learner.weighting.name,
        "device": t.learner.device.type,
        "validation_version": t.validation.version,
        "unscored": len(t.table.unscored),
        "state": _state(t),
        "idle": int(t.idler.idle),
        **t.metrics.freshness.summary(),
        **({"weighting": report} if (report := t.learner.weighting.report()) else {}),
    }


def _state(t: Trainer) -> str:
    if t.idler.idle:
        return "idle"
    if not t.table.live:
        return "waiting_for_samples"
    return "training" if t.validation.samples else "training_without_validation_set"


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)
