"""A trainer people can live with: it says what it waits for, and it idles on a buffer with nothing new to
learn, resuming as soon as there is something."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from store.keys import Keys
from tests.trainer.conftest import MLP, N_CLASSES, blobs
from trainer.loop import Trainer

WAITING = (
    "no validation set yet: PUT /v1/validation with trusted samples (see README); "
    "training uniformly meanwhile"
)


@pytest.fixture
def api(make_settings: Callable[..., Any], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(model="mlp", model_params=MLP))


@contextmanager
def running(trainer: Trainer) -> Iterator[threading.Thread]:
    """``trainer.run()`` in a thread, stopped (a final checkpoint) and joined at the end."""
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(trainer.run()), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        trainer.stop_requested = True
        thread.join(timeout=60)
    assert codes == [0]


def until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status(client: redis.Redis) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(Keys().trainer).items()}


def test_an_unchanging_buffer_idles_and_a_new_sample_resumes_training(
    api: TestClient,
    make_trainer: Callable[..., Trainer],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="datadiet.trainer")
    api.put("/v1/validation", json={"samples": blobs(64, 9, source="v", noisy=False, prefix="v")})
    api.post("/v1/samples", json={"samples": blobs(200, 1, source="a", noisy=False, prefix="a")})
    # quiet after 0.3 s; any fall of the loss under 100 is no improvement: a plateau after 20 steps
    trainer = make_trainer(idle_after_s=0.3, idle_patience=20, idle_min_delta=100.0)
    with running(trainer):
        until(lambda: status(redis_client).get("state") == "idle", 30, "the trainer to idle")
        idle_step = trainer.step
        assert trainer.idler.idle and status(redis_client)["idle"] == "1"
        assert api.get("/v1/stats").json()["trainer"]["state"] == "idle"
        cpu = time.process_time()  # this process's CPU: the trainer's thread, this one sleeps
        time.sleep(1.0)
        assert trainer.step == idle_step, "an idle trainer trained"
        assert time.process_time() - cpu < 0.3, "an idle trainer spins instead of waiting on the stream"

        posted = time.monotonic()
        api.post("/v1/samples", json={"samples": blobs(1, 2, source="b", noisy=False, prefix="b")})
        until(lambda: trainer.step > idle_step, 5, "training to resume")
        assert time.monotonic() - posted < 2.5  # the blocking read wakes at once, not at a timer
        until(lambda: trainer.idler.idle, 30, "the trainer to idle again")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("idle: no new samples for") for m in messages), messages[-5:]
    assert "resuming training: 1 new sample" in messages
    assert trainer.table.live == 201


def test_a_new_validation_set_wakes_an_idle_trainer(
    api: TestClient, make_trainer: Callable[..., Trainer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="datadiet.trainer")
    api.post("/v1/samples", json={"samples": blobs(100, 1, source="a", noisy=False, prefix="a")})
    api.put("/v1/validation", json={"samples": blobs(32, 9, source="v", noisy=False, prefix="v")})
    trainer = make_trainer(idle_after_s=0.2, idle_patience=10, idle_min_delta=100.0, reweight="uniform")
    with running(trainer):
        until(lambda: trainer.idler.idle, 30, "the trainer to idle")
        api.put("/v1/validation", json={"samples": blobs(32, 8, source="v", noisy=False, prefix="w")})
        until(lambda: not trainer.idler.idle, 5, "the new validation set to wake it")
    assert "resuming training: validation set v2" in [r.getMessage() for r in caplog.records]


def test_when_the_validation_loss_rose_the_newest_checkpoint_is_the_best_model(
    api: TestClient, make_trainer: Callable[..., Trainer], caplog: pytest.LogCaptureFixture
) -> None:
    """The validation set labels every blob as the next class: training on the right labels can only
    raise its loss, so the best weights of the quiet spell are its first, and those are what agents get."""
    caplog.set_level(logging.INFO, logger="datadiet.trainer")
    shifted = [
        {**s, "target": (s["target"] + 1) % N_CLASSES}
        for s in blobs(64, 9, source="v", noisy=False, prefix="v")
    ]
    api.put("/v1/validation", json={"samples": shifted})
    api.post("/v1/samples", json={"samples": blobs(300, 1, source="a", noisy=False, prefix="a")})
    trainer = make_trainer(idle_after_s=0.0, idle_patience=40, idle_min_delta=0.0, reweight="uniform")
    with running(trainer):
        until(lambda: trainer.idler.idle, 30, "the trainer to idle")
    rose = trainer.idler.last_loss
    best = trainer.idler.best
    assert rose > best + 0.01, (best, rose)
    assert any("back to the step-" in r.getMessage() for r in caplog.records)
    newest = api.get("/v1/checkpoints/latest").json()
    assert newest["metrics"]["val_loss"] == pytest.approx(best, abs=1e-5)


def test_without_a_validation_set_the_trainer_says_what_it_waits_for(
    api: TestClient,
    make_trainer: Callable[..., Trainer],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="datadiet.trainer")
    api.post("/v1/samples", json={"samples": blobs(100, 1, source="a", noisy=False, prefix="a")})
    assert make_trainer(max_steps=40, progress_every_s=0.001).run() == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(WAITING) == 1  # at the start, then every 30 s
    progress = [m for m in messages if m.startswith("step ")]
    assert progress and all("val_loss (no validation set)" in m and "nan" not in m for m in progress)
    s = status(redis_client)
    assert s["state"] == "training_without_validation_set" and s["val_loss"] == ""
    trainer_stats = api.get("/v1/stats").json()["trainer"]
    assert trainer_stats["val_loss"] is None and trainer_stats["state"] == "training_without_validation_set"
