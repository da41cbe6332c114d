"""The trainer under faults: unusable samples, Redis and database outages, a second trainer.

Real processes, a real redis-server and PostgreSQL; outages are made by stopping what the test started or
by a TCP proxy the test owns (tests/faultproxy.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import torch
from fastapi.testclient import TestClient
from faultproxy import FaultProxy
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.schema import to_record
from store.buffer import SampleBuffer
from store.checkpoints import sha256_file, write_atomic
from store.keys import Keys
from store.meta import Checkpoint, make_engine
from store.processes import start_redis_server, stop_process_group
from tests.conftest import POSTGRES_ENV
from tests.trainer.conftest import MLP, N_FEATURES, blobs, published_checkpoints, start_trainer, wait_for
from trainer.loop import EXIT_LEASE_LOST


def _store_unvalidated(redis_url: str, samples: list[dict[str, Any]]) -> None:
    """Put samples in the buffer as an API that did not check them would have (an older release, a
    different model config): the trainer must cope with whatever is in the buffer."""

    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await SampleBuffer(client, Keys(), 1_000_000, 1000).ingest([to_record(s) for s in samples])
        finally:
            await client.aclose()

    asyncio.run(go())


def _versions_and_hashes(database_url: str) -> list[tuple[int, str, str]]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            rows = session.scalars(select(Checkpoint).order_by(Checkpoint.version)).all()
            return [(r.version, r.sha256, r.path) for r in rows]
    finally:
        engine.dispose()


def _assert_every_published_file_matches_its_row(database_url: str) -> list[int]:
    rows = _versions_and_hashes(database_url)
    for version, sha, path in rows:
        assert sha256_file(path) == sha, f"checkpoint v{version}'s bytes do not match its advertised sha256"
    versions = [v for v, _, _ in rows]
    assert versions == sorted(set(versions))
    return versions


# --- a sample the trainer cannot use -------------------------------------------------------------------


def test_samples_the_model_cannot_use_are_quarantined_and_training_goes_on(
    redis_url: str,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Any],
) -> None:
    """One value float32 cannot hold (fails to collate) and one that overflows inside the model (a
    non-finite loss): both are set aside with their reasons, counted and listed; the model stays finite."""
    api = make_client(make_settings(model="mlp", model_params=MLP))
    good = blobs(300, 1, source="good", noisy=False, prefix="g")
    overflow = {"id": "too-big", "source": "odd", "input": [1e39] * N_FEATURES, "target": 0}
    huge = {"id": "huge", "source": "odd", "input": [3e38] * N_FEATURES, "target": 1}
    _store_unvalidated(redis_url, [*good[:150], overflow, huge, *good[150:]])
    api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")})

    trainer = make_trainer(max_steps=40, checkpoint_every=20)
    assert trainer.run() == 0
    assert trainer.step == 40
    assert all(bool(torch.isfinite(p).all()) for p in trainer.learner.model.parameters())

    stats = api.get("/v1/stats").json()["buffer"]
    assert stats["quarantined"] == 2
    assert stats["size"] == 300 and stats["ingested"] == 302  # accepted = stored + evicted + quarantined
    listed = api.get("/v1/quarantine").json()
    assert listed["count"] == 2
    reasons = {s["id"]: s["reason"] for s in listed["samples"]}
    assert "does not collate" in reasons["too-big"] and "finite" in reasons["too-big"]
    assert "not finite" in reasons["huge"]
    assert {s["source"] for s in listed["samples"]} == {"odd"}
    assert listed["samples"][0]["sample"]["input"][0] in (1e39, 3e38)  # the sample as it was posted
    assert api.get("/v1/samples/too-big").status_code == 404  # it left the buffer


def test_a_validation_sample_the_model_cannot_use_is_left_out_not_fatal(
    redis_url: str, make_trainer: Callable[..., Any]
) -> None:
    _store_unvalidated(redis_url, blobs(200, 1, source="good", noisy=False, prefix="g"))
    val = blobs(16, 2, source="v", noisy=False, prefix="v")
    val[3]["input"] = [1e39] * N_FEATURES
    r = redis.Redis.from_url(redis_url)
    import orjson

    r.rpush(Keys().val_samples, *[orjson.dumps(v) for v in val])
    r.set(Keys().val_version, 1)
    trainer = make_trainer(max_steps=20)
    assert trainer.run() == 0
    assert len(trainer.validation.samples) == 15 and trainer.validation.unusable == 1
    assert trainer.validation.g_val is not None  # it scored against the usable 15


# --- dependency outages --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_trainer_outlives_a_redis_restart_and_goes_on_learning(
    tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    server = start_redis_server(tmp_path / "redis", persistent=True)
    log = tmp_path / "trainer.log"
    proc = None
    try:
        api = make_client(make_settings(redis_url=server.url, model="mlp", model_params=MLP))
        api.post("/v1/samples", json={"samples": blobs(400, 1, source="a", noisy=False, prefix="a")})
        api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")})
        proc = start_trainer(server.url, tmp_path / "data", log, max_backoff_s="1")
        wait_for(lambda: len(api.get("/v1/checkpoints").json()) >= 1, 120, "a checkpoint", log)

        server.stop()  # SIGTERM: the append-only file is flushed; the trainer's connections drop
        time.sleep(3)
        assert proc.poll() is None, f"the trainer died with Redis:\n{log.read_text()[-3000:]}"
        server = start_redis_server(tmp_path / "redis", port=server.port, persistent=True)

        step = api.get("/v1/stats").json()["trainer"]["step"] or 0
        api.post("/v1/samples", json={"samples": blobs(100, 3, source="late", noisy=False, prefix="b")})
        wait_for(
            lambda: (
                (api.get("/v1/stats").json()["trainer"]["step"] or 0) > step + 50
                and "late" in api.get("/v1/weights").json()["sources"]
            ),
            120,
            "training on samples posted after the restart",
            log,
        )
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc is not None:
            stop_process_group(proc)
        server.stop()
    text = log.read_text()
    assert text.count("redis unavailable") == 1, "one line per outage, not one per retry"
    assert "redis is back" in text
    assert api.get("/v1/checkpoints/latest").json()["metrics"]["val_loss"] is not None


# every checkpoint kept: retention (5 by default) would delete the oldest rows the test counts
KEEP_ALL = {"keep_checkpoints": "100000"}


@pytest.mark.slow
def test_checkpoints_written_while_the_database_refuses_are_registered_when_it_returns(
    redis_url: str,
    tmp_path: Path,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    request: pytest.FixtureRequest,
) -> None:
    """The database refuses connections (a restart, a failover): the trainer keeps training and writing
    checkpoint files; a trainer restarted during the outage waits instead of dying; when the database
    answers again, every checkpoint written meanwhile gets its row."""
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"needs PostgreSQL ({POSTGRES_ENV})")
    from sqlalchemy.engine import make_url

    from tests.conftest import drop_all_tables

    direct: str = request.getfixturevalue("postgres_database")
    drop_all_tables(direct)
    url = make_url(direct)
    log = tmp_path / "trainer.log"
    data_dir = tmp_path / "data"
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = proxy.rewrite(direct)
        api = make_client(make_settings(database_url=direct, model="mlp", model_params=MLP))
        api.post("/v1/samples", json={"samples": blobs(400, 1, source="a", noisy=False, prefix="a")})
        api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")})
        proc = start_trainer(redis_url, data_dir, log, database_url=proxied, max_backoff_s="1", **KEEP_ALL)
        try:
            wait_for(lambda: _versions_and_hashes(direct), 120, "a registered checkpoint", log)
            proxy.set_mode("refuse")
            registered = max(v for v, _, _ in _versions_and_hashes(direct))
            ckpts = data_dir / "checkpoints"
            wait_for(
                lambda: len(list(ckpts.glob("v*.safetensors"))) >= registered + 2,
                120,
                "checkpoint files written during the outage",
                log,
            )
            assert proc.poll() is None
            os.killpg(proc.pid, signal.SIGTERM)  # stopped during the outage ...
            assert proc.wait(timeout=60) == 0
            proc = start_trainer(
                redis_url, data_dir, log, database_url=proxied, max_backoff_s="1", **KEEP_ALL
            )
            time.sleep(4)  # ... and started again: it waits for the database instead of dying
            assert proc.poll() is None, log.read_text()[-3000:]
            on_disk = len(list(ckpts.glob("v*.safetensors")))
            proxy.set_mode("pass")
            wait_for(
                lambda: len(_versions_and_hashes(direct)) > on_disk,
                120,
                "the outage's checkpoints registered and training resumed",
                log,
            )
        finally:
            stop_process_group(proc)
    versions = _assert_every_published_file_matches_its_row(direct)
    assert versions == list(range(1, len(versions) + 1)), "a checkpoint written in the outage was lost"
    assert "database unavailable" in log.read_text()


# --- two trainers ----------------------------------------------------------------------------------------


def test_a_published_checkpoint_file_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "v00000001.safetensors"
    write_atomic(path, b"first", replace=False)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", replace=False)
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.slow
def test_a_second_trainer_waits_for_the_lease_and_takes_over_when_the_first_stops(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    """A rolling restart: B starts while A trains. B writes nothing until A stops; then it resumes from
    A's final checkpoint. No version is written twice; every file matches its advertised sha256."""
    data_dir = tmp_path / "data"
    api = make_client(make_settings(model="mlp", model_params=MLP))
    api.post("/v1/samples", json={"samples": blobs(400, 1, source="a", noisy=False, prefix="a")})
    api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")})
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_trainer(redis_url, data_dir, log_a)
    b = None
    try:
        wait_for(lambda: published_checkpoints(api), 120, "A's first checkpoint", log_a)
        b = start_trainer(redis_url, data_dir, log_b)
        wait_for(lambda: "another trainer holds" in log_b.read_text(), 60, "B to wait for the lease", log_b)
        time.sleep(2)
        assert b.poll() is None and "published checkpoint" not in log_b.read_text()
        os.killpg(a.pid, signal.SIGTERM)
        assert a.wait(timeout=60) == 0
        version, step = re.findall(r"published checkpoint v(\d+) at step (\d+)", log_a.read_text())[-1]
        wait_for(lambda: "published checkpoint" in log_b.read_text(), 120, "B to take over", log_b)
        assert f"resumed from checkpoint v{version} at step {step}" in log_b.read_text()
    finally:
        stop_process_group(a)
        if b is not None:
            stop_process_group(b)
    _assert_every_published_file_matches_its_row(f"sqlite:///{data_dir / 'meta.db'}")


def test_a_second_trainer_told_not_to_wait_exits_at_once_with_a_clear_message(
    redis_url: str, tmp_path: Path
) -> None:
    held = redis.Redis.from_url(redis_url)
    held.set(Keys().lease, "7 some-other-host 1234", px=60_000)  # a live trainer elsewhere
    log = tmp_path / "trainer.log"
    proc = start_trainer(redis_url, tmp_path / "data", log, lease_wait="false")
    try:
        assert proc.wait(timeout=60) == EXIT_LEASE_LOST
    finally:
        stop_process_group(proc)
    text = log.read_text()
    assert "another trainer holds this deployment's lease" in text and "some-other-host" in text
    assert not (tmp_path / "data" / "checkpoints").exists() or not any(
        (tmp_path / "data" / "checkpoints").iterdir()
    )


@pytest.mark.slow
def test_a_trainer_paused_past_its_lease_cannot_publish_over_its_successor(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    """Fencing: A hangs (SIGSTOP) past its lease, B takes over; A wakes up mid-run and must stop at its
    next write instead of publishing a stale model or weights."""
    data_dir = tmp_path / "data"
    api = make_client(make_settings(model="mlp", model_params=MLP))
    api.post("/v1/samples", json={"samples": blobs(400, 1, source="a", noisy=False, prefix="a")})
    api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")})
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_trainer(redis_url, data_dir, log_a, lease_ttl_s="2")
    b = None
    try:
        wait_for(lambda: published_checkpoints(api), 120, "A's first checkpoint", log_a)
        os.killpg(a.pid, signal.SIGSTOP)
        b = start_trainer(redis_url, data_dir, log_b, lease_ttl_s="2")
        wait_for(lambda: "published checkpoint" in log_b.read_text(), 120, "B to take over", log_b)
        os.killpg(a.pid, signal.SIGCONT)
        assert a.wait(timeout=60) == EXIT_LEASE_LOST, log_a.read_text()
        assert "another trainer" in log_a.read_text()
        assert b.poll() is None
    finally:
        stop_process_group(a)
        if b is not None:
            stop_process_group(b)
    _assert_every_published_file_matches_its_row(f"sqlite:///{data_dir / 'meta.db'}")


@pytest.mark.slow
def test_a_trainer_paused_while_it_resumes_stops_at_its_successors_changes_instead_of_crashing(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    """Fencing covers start-up too: A is paused the moment it holds the lease, before or while it resumes
    from the newest checkpoint; B takes over and its retention (keep 1) deletes the files A was about to
    read. A wakes to a changed world: it must stop with the lease-lost status (75), not crash (1), and
    touch nothing of B's."""
    data_dir = tmp_path / "data"
    api = make_client(make_settings(model="mlp", model_params=MLP))
    api.post("/v1/samples", json={"samples": blobs(400, 1, source="a", noisy=False, prefix="a")})
    api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")})
    first = start_trainer(redis_url, data_dir, tmp_path / "first.log", max_steps="60")
    assert first.wait(timeout=120) == 0  # checkpoints to resume from
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_trainer(redis_url, data_dir, log_a, lease_ttl_s="1")
    b = None
    try:
        deadline = time.monotonic() + 120
        while "holding the trainer lease" not in log_a.read_text():
            assert a.poll() is None and time.monotonic() < deadline, log_a.read_text()
            time.sleep(0.002)
        os.killpg(a.pid, signal.SIGSTOP)
        b = start_trainer(redis_url, data_dir, log_b, lease_ttl_s="1", keep_checkpoints="1")
        wait_for(lambda: "retention: deleted" in log_b.read_text(), 120, "B to publish and prune", log_b)
        os.killpg(a.pid, signal.SIGCONT)
        assert a.wait(timeout=60) == EXIT_LEASE_LOST, log_a.read_text()
        assert "another trainer" in log_a.read_text() and "Traceback" not in log_a.read_text()
        time.sleep(1)
        assert b.poll() is None, log_b.read_text()
    finally:
        stop_process_group(a)
        if b is not None:
            stop_process_group(b)
    assert "Traceback" not in log_b.read_text()
    _assert_every_published_file_matches_its_row(f"sqlite:///{data_dir / 'meta.db'}")
