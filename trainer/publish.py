"""Everything the trainer makes visible to others, in one place (rank 0's work in data-parallel runs):
per-sample and per-source weights and status in Redis, checkpoints (file, resumable state, SQL row) and
weight snapshots in SQL, and the progress line on the terminal.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.checkpoints import checkpoint_path
from store.feed import TrainerFeed
from store.meta import Checkpoint, WeightSnapshot, next_checkpoint_version
from trainer.checkpoint import save_checkpoint
from trainer.models.base import TrainModel
from trainer.state import TrainerState, prune_states, save_state
from trainer.table import WeightTable

log = logging.getLogger("datadiet.trainer")

HIST_EDGES = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
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
    def __init__(self, feed: TrainerFeed, engine: Engine, data_dir: Path, publish_every_s: float) -> None:
        self.feed = feed
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.min_interval = publish_every_s
        self.interval = publish_every_s
        self.last_publish = 0.0
        self.last_doc: dict[str, Any] | None = None

    def due(self) -> bool:
        return time.monotonic() - self.last_publish >= self.interval

    def publish_weights(self, table: WeightTable, step: int, method: str, status: dict[str, Any]) -> None:
        t0 = time.monotonic()
        doc = weights_document(table, step, method)
        alive = table.alive
        self.feed.publish_weights(doc, table.ordinal[alive], table.weight[alive])
        self.feed.set_status(
            step=step,
            updated_at=doc["updated_at"],
            effective_fraction=doc["summary"]["effective_fraction"],
            live=doc["summary"]["count"],
            table_evicted=table.evicted,
            **status,
        )
        took = time.monotonic() - t0
        # at a million samples a full publish takes a while: never spend more than ~10% of the time on it
        self.interval = max(self.min_interval, 10 * took)
        self.last_publish = time.monotonic()
        self.last_doc = doc

    def checkpoint(
        self, model: TrainModel, state: TrainerState, metrics: dict[str, Any], settings: dict[str, Any]
    ) -> Checkpoint:
        """Publish a checkpoint: model file, resumable state, then the SQL row that makes it visible."""
        with Session(self.engine) as session:
            version = next_checkpoint_version(session)
        path = checkpoint_path(self.data_dir, version)
        sha, size = save_checkpoint(
            path, model, {"step": state.step, "version": version, "settings": settings}
        )
        save_state(self.data_dir, version, state)
        row = Checkpoint(
            version=version,
            step=state.step,
            sha256=sha,
            size=size,
            path=str(path.resolve()),
            model_kind=model.kind,
            config=model.config,
            metrics=metrics,
        )
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.add(row)
            if self.last_doc is not None:
                doc = self.last_doc
                session.add(WeightSnapshot(step=state.step, sources=doc["sources"], summary=doc["summary"]))
        prune_states(self.data_dir, version)
        return row
