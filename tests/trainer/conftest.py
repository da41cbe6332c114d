"""Helpers for the trainer's behaviour tests: a synthetic two-source stream and an in-process trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from store.feed import TrainerFeed
from store.meta import make_engine, migrate
from store.processes import datadiet_env, spawn, stop_process_group
from tests.conftest import REPO_ROOT
from trainer.loop import Trainer
from trainer.settings import TrainerSettings

N_FEATURES, N_CLASSES = 16, 4
MLP = {"n_features": N_FEATURES, "n_classes": N_CLASSES}


def blobs(n: int, seed: int, *, source: str, noisy: bool, prefix: str) -> list[dict[str, Any]]:
    """Gaussian blobs, one per class (fixed centres); a noisy source's labels are uniformly random."""
    centres = np.random.default_rng(1234).normal(0, 1.5, size=(N_CLASSES, N_FEATURES))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, size=n)
    x = centres[y] + rng.normal(0, 1.0, size=(n, N_FEATURES))
    label = rng.integers(0, N_CLASSES, size=n) if noisy else y
    return [
        {
            "id": f"{prefix}-{i}",
            "source": source,
            "input": [round(float(v), 5) for v in x[i]],
            "target": int(label[i]),
            "meta": {"corrupted": bool(label[i] != y[i])},
        }
        for i in range(n)
    ]


def start_trainer(redis_url: str, data_dir: Path, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    """``python -m trainer`` on an mlp, logging to ``log``, in a new process group; ``settings`` become
    ``DATADIET_*`` variables (they override the defaults here)."""
    env = datadiet_env(
        redis_url=redis_url,
        data_dir=str(data_dir),
        model="mlp",
        model_config=json.dumps(MLP),
        checkpoint_every="25",
        torch_threads="1",
        **settings,
    )
    return spawn([sys.executable, "-m", "trainer"], log=log, env=env, cwd=REPO_ROOT)


def published_checkpoints(api: TestClient) -> list[dict[str, Any]]:
    """The checkpoints the API lists; [] while there are none or the API cannot say (a 503 while the
    trainer holds SQLite's write lock is an error document, not a list)."""
    r = api.get("/v1/checkpoints")
    return r.json() if r.status_code == 200 else []


def sigkill_after_checkpoints(
    api: TestClient, proc: subprocess.Popen[bytes], log: Path, *, versions: int
) -> dict[str, Any]:
    """SIGKILL the trainer ``proc`` once checkpoint ``versions`` is published; returns the newest
    checkpoint's metadata as the API lists it then (what a restart must resume from)."""
    try:
        wait_for(
            lambda: (published_checkpoints(api) or [{}])[0].get("version", 0) >= versions,
            120,
            f"{versions} checkpoints",
            log,
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop_process_group(proc)
    latest: dict[str, Any] = api.get("/v1/checkpoints/latest").json()
    return latest


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; trainer log:\n{log.read_text()[-3000:]}")


@pytest.fixture
def make_trainer(redis_url: str, tmp_path: Path) -> Callable[..., Trainer]:
    """``make_trainer(**settings)``: a Trainer on the test's Redis and a SQLite under tmp (mlp by default)."""

    def make(**overrides: Any) -> Trainer:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "data_dir": tmp_path / "data",
            "model": "mlp",
            "model_params": MLP,
            "checkpoint_every": 10_000,
            "torch_threads": 1,
            "progress_every_s": 3600.0,
            **overrides,
        }
        settings = TrainerSettings(_env_file=None, **values)  # type: ignore[call-arg]
        engine = make_engine(settings.resolved_database_url)
        migrate(engine)
        client = redis.Redis.from_url(redis_url)
        feed = TrainerFeed(client, settings.keys, settings.consumer, settings.lease_ttl_s)
        return Trainer(settings, feed, engine)

    return make


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (scikit-learn's)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))
