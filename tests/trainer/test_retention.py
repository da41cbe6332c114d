"""Retention: the trainer keeps the newest checkpoints, never the one a download is using, and a capped
weight history."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.keys import Keys
from store.meta import Checkpoint, WeightSnapshot, make_engine
from tests.trainer.conftest import MLP, blobs


@pytest.fixture
def api(make_settings: Callable[..., Any], make_client: Callable[..., TestClient]) -> TestClient:
    """The API on an mlp deployment holding 300 clean samples."""
    client = make_client(make_settings(model="mlp", model_params=MLP))
    samples = blobs(300, 1, source="a", noisy=False, prefix="a")
    assert client.post("/v1/samples", json={"samples": samples}).status_code == 202
    return client


def test_old_checkpoints_are_deleted_except_the_newest_and_one_in_use(
    tmp_path: Path, redis_client: redis.Redis, api: TestClient, make_trainer: Callable[..., Any]
) -> None:
    redis_client.zadd(Keys().downloads, {"2": time.time() + 3600})  # an agent is downloading v2
    trainer = make_trainer(max_steps=80, checkpoint_every=10, keep_checkpoints=3, keep_weight_snapshots=2)
    assert trainer.run() == 0

    engine = make_engine(f"sqlite:///{(tmp_path / 'data' / 'meta.db').resolve()}")
    with Session(engine) as session:
        versions = sorted(session.scalars(select(Checkpoint.version)).all())
        snapshots = session.scalar(select(func.count()).select_from(WeightSnapshot))
    engine.dispose()
    assert versions == [2, 6, 7, 8]  # the newest three, and the one in use
    on_disk = sorted(int(p.name[1:9]) for p in (tmp_path / "data" / "checkpoints").glob("v*.safetensors"))
    assert on_disk == versions
    assert snapshots == 2
    assert api.get("/v1/checkpoints/2/file").status_code == 200
    assert api.get("/v1/checkpoints/1/file").status_code == 404


def test_a_download_marks_its_checkpoint_in_use_for_a_while_after_it_ends(
    redis_client: redis.Redis, api: TestClient, make_trainer: Callable[..., Any]
) -> None:
    assert make_trainer(max_steps=10, checkpoint_every=10).run() == 0
    before = time.time()
    assert api.get("/v1/checkpoints/1/file").status_code == 200
    until = redis_client.zscore(Keys().downloads, "1")
    assert until is not None and until > before + 60  # resumable by Range for minutes after
