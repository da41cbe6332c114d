"""Freshness: the time from a sample's POST to its first use in a training step (issue 14's measure)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis
from fastapi.testclient import TestClient

from store.keys import Keys
from tests.trainer.conftest import MLP, blobs
from trainer.loop import Trainer
from trainer.table import WeightTable


def test_a_queued_sample_holds_its_arrival_until_its_first_use_and_only_then() -> None:
    t = WeightTable()
    rows = t.add(np.arange(4), np.arange(4, dtype=np.uint64), ["a"] * 4, np.array([1000, 2000, 3000, 4000]))
    assert t.take_unscored(2).tolist() == [0, 1]
    assert t.take_first_uses(trained=True).tolist() == [1000, 2000]
    assert t.take_first_uses(trained=True).tolist() == []  # read once
    t.unscored.extend(rows[:1])  # queued again after its first use (min_visits): no arrival
    assert t.take_unscored(2).tolist() == [2, 3]
    t.kill(np.array([2]))  # its payload was gone when the batch was fetched: evicted, never used
    assert t.take_first_uses(trained=True).tolist() == [4000]
    assert t.take_unscored(5).tolist() == [0]
    assert t.take_first_uses(trained=True).tolist() == []  # not a first use
    t.add(np.array([9]), np.array([9], dtype=np.uint64), ["a"], np.array([5000]))
    assert len(t.take_unscored(1)) == 1
    assert t.take_first_uses(trained=False).tolist() == []  # a batch set aside: not a use, forgotten
    assert t.take_first_uses(trained=True).tolist() == []
    assert len(t.unscored.arrivals()) == 0  # nothing is held per row once the queue is empty


def test_arrivals_follow_their_rows_through_compaction_and_a_saved_state() -> None:
    t = WeightTable()
    t.add(np.arange(8), np.arange(8, dtype=np.uint64), ["a"] * 8, 1000 * np.arange(1, 9))
    t.kill(np.arange(0, 8, 2))  # half the rows go: the table compacts
    assert t.compact() is not None
    restored = WeightTable.from_state(*t.state())
    for table in (t, restored):
        assert table.take_unscored(8).tolist() == [0, 1, 2, 3]
        assert table.take_first_uses(trained=True).tolist() == [2000, 4000, 6000, 8000]


def test_freshness_is_measured_from_post_to_first_training_use(
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
    redis_client: redis.Redis,
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP))
    api.put("/v1/validation", json={"samples": blobs(64, 9, source="v", noisy=False, prefix="v")})
    trainer = make_trainer(publish_every_s=0.05)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while trainer.validation.version < 1:  # the loop is running: what follows measures it, not its start
            assert time.monotonic() < deadline, "the trainer did not start"
            time.sleep(0.02)
        posted = time.time()
        api.post("/v1/samples", json={"samples": blobs(200, 1, source="a", noisy=False, prefix="a")})
        deadline = time.monotonic() + 30
        while redis_client.hget(Keys().trainer, "freshness_n") != b"200":
            assert time.monotonic() < deadline, redis_client.hgetall(Keys().trainer)
            time.sleep(0.05)
        elapsed = time.time() - posted
        status = {k.decode(): v.decode() for k, v in redis_client.hgetall(Keys().trainer).items()}
    finally:
        trainer.stop_requested = True
        thread.join(timeout=60)
    p50, p99 = float(status["freshness_p50_s"]), float(status["freshness_p99_s"])
    assert 0 < p50 <= p99 < elapsed, (p50, p99, elapsed)
    # every one of the 200 was observed once, into the Prometheus histogram too
    registry = trainer.metrics.registry
    assert registry.get_sample_value("datadiet_trainer_freshness_seconds_count") == 200
    total = registry.get_sample_value("datadiet_trainer_freshness_seconds_sum")
    assert total is not None and 0 < total < 200 * elapsed
