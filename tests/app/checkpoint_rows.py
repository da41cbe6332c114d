"""Publish a checkpoint the way the trainer does (file first, then its row), without torch.

The API serves any bytes the row points at, so the HTTP tests use arbitrary bytes (or a large sparse file)
and stay fast. ``from checkpoint_rows import publish_checkpoint`` (``tests/app`` is on ``sys.path``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy.orm import Session

from store.checkpoints import checkpoint_path, write_atomic
from store.meta import Checkpoint, make_engine, migrate


def publish_checkpoint(
    database_url: str, data_dir: Path, version: int, data: bytes | None = None, *, sparse_size: int = 0
) -> Checkpoint:
    """Write checkpoint ``version`` under ``data_dir`` and register it in ``database_url``.

    ``data`` is the file's bytes; with ``sparse_size`` instead, a sparse file of that many zero bytes
    (cheap to create, large enough to fill socket buffers when a client stops reading).
    """
    path = checkpoint_path(data_dir, version)
    if data is not None:
        sha = write_atomic(path, data)
        size = len(data)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(sparse_size)
        sha = hashlib.sha256(b"sparse %d" % sparse_size).hexdigest()  # the API never re-hashes
        size = sparse_size
    row = Checkpoint(version=version, step=10 * version, sha256=sha, size=size, path=str(path),
                     model_kind="mlp", config={"n_features": 4}, metrics={"val_loss": 1.5})  # fmt: skip
    engine = make_engine(database_url)
    try:
        migrate(engine)
        with Session(engine, expire_on_commit=False) as session, session.begin():
            session.add(row)
    finally:
        engine.dispose()
    return row
