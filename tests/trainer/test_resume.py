"""A trainer killed with SIGKILL resumes from its last checkpoint and loses no accepted sample."""

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

import redis
from fastapi.testclient import TestClient

from store.keys import Keys
from store.meta import Checkpoint, make_engine
from tests.conftest import REPO_ROOT, datadiet_env, stop_process_group
from tests.trainer.conftest import MLP, blobs
from trainer.state import load_state

CAPACITY = 2500


def start_trainer(redis_url: str, data_dir: Path, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    env = datadiet_env(
        redis_url=redis_url,
        data_dir=str(data_dir),
        model="mlp",
        model_config=json.dumps(MLP),
        checkpoint_every="25",
        torch_threads="1",
        **settings,
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; trainer log:\n{log.read_text()[-3000:]}")


def test_sigkilled_trainer_resumes_and_every_accepted_sample_is_kept_or_evicted(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    data_dir = tmp_path / "data"
    api = make_client(make_settings(model="mlp", model_params=MLP, buffer_max_samples=CAPACITY))
    first = blobs(2000, 1, source="clean", noisy=False, prefix="a")
    assert api.post("/v1/samples", json={"samples": first}).status_code == 202
    assert (
        api.put(
            "/v1/validation", json={"samples": blobs(64, 3, source="v", noisy=False, prefix="v")}
        ).status_code
        == 200
    )
    log = tmp_path / "trainer.log"

    proc = start_trainer(redis_url, data_dir, log)
    try:
        wait_for(
            lambda: (api.get("/v1/checkpoints").json() or [{}])[0].get("version", 0) >= 2,
            120,
            "two checkpoints",
            log,
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop_process_group(proc)
    killed_at = api.get("/v1/checkpoints/latest").json()

    # accepted while the trainer is down; over capacity, so the buffer evicts the oldest unweighted ones
    second = blobs(1000, 2, source="late", noisy=False, prefix="b")
    assert api.post("/v1/samples", json={"samples": second}).status_code == 202
    final_step = killed_at["step"] + 60
    proc = start_trainer(redis_url, data_dir, log, max_steps=str(final_step))
    try:
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    text = log.read_text()
    assert f"resumed from checkpoint v{killed_at['version']} at step {killed_at['step']}" in text, text[
        -3000:
    ]

    latest = api.get("/v1/checkpoints/latest").json()
    assert latest["step"] == final_step
    state = load_state(data_dir, latest["version"])
    assert state is not None and state.step == final_step
    table = state.table_arrays
    in_table = {int(o) for o, alive in zip(table["ordinal"], table["alive"], strict=True) if alive}
    r = redis.Redis.from_url(redis_url)
    live = {int(o) for o in r.hkeys(Keys().samples)}
    counters = {k.decode(): int(v) for k, v in r.hgetall(Keys().counters).items()}
    assert counters["ingested"] == 3000
    assert counters["evicted"] == 3000 - CAPACITY
    assert in_table == live  # every accepted sample is in the table, or counted as evicted
    assert len(live) + counters["evicted"] == counters["ingested"]
    with make_engine(f"sqlite:///{data_dir / 'meta.db'}").connect() as conn:
        versions = [row.version for row in conn.execute(Checkpoint.__table__.select())]
    assert versions == sorted(set(versions)) and len(versions) >= 3
