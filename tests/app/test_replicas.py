"""API replicas share nothing but Redis, the database and the checkpoint directory (issue 16): two real API
processes on one Redis, one SQLite file and one checkpoint dir (the local variant of a shared volume) serve
the same samples, the same weights document (each one's cache follows the trainer's announcements) and the
same checkpoint bytes under the same ETag."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from checkpoint_rows import publish_checkpoint
from published_weights import trainer_feed, weights_doc


def served_step(base: str, step: int, within_s: float = 2.0) -> httpx.Response:
    start = time.monotonic()
    while True:
        got = httpx.get(f"{base}/v1/weights")
        if got.json()["step"] == step or time.monotonic() - start > within_s:
            return got
        time.sleep(0.02)


def test_two_replicas_serve_the_same_samples_weights_and_checkpoints(
    start_api: Callable[..., str], redis_url: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    database_url = f"sqlite:///{shared / 'meta.db'}"
    settings = {
        "data_dir": str(shared),
        "database_url": database_url,
        "model": "mlp",
        "model_config": json.dumps({"n_features": 2, "n_classes": 3}),
    }
    a, b = start_api(**settings), start_api(**settings)

    samples = [{"id": f"s{i}", "source": "a", "input": [i, 1.5], "target": i % 3} for i in range(3)]
    assert httpx.post(f"{a}/v1/samples", json={"samples": samples}).status_code == 202
    assert httpx.get(f"{b}/v1/samples/s2").json()["input"] == [2, 1.5]
    assert httpx.get(f"{a}/v1/stats").json()["buffer"] == httpx.get(f"{b}/v1/stats").json()["buffer"]

    feed = trainer_feed(redis_url)
    for step in (1, 2):  # each replica's cached document follows every publication
        feed.publish_weights(weights_doc(step, count=3), ordinals=[1, 2, 3], weights=[0.5, 1.0, 1.5])
        on_a, on_b = served_step(a, step), served_step(b, step)
        assert on_a.json()["step"] == on_b.json()["step"] == step
        assert on_a.headers["etag"] == on_b.headers["etag"]
    got = httpx.get(f"{b}/v1/weights/samples", params={"ids": "s0,s2"}).json()
    assert got == {"step": 2, "weights": {"s0": 0.5, "s2": 1.5}}

    publish_checkpoint(database_url, shared, 1, b"the model's bytes")
    from_a = httpx.get(f"{a}/v1/checkpoints/latest/file")
    assert from_a.content == b"the model's bytes"
    unchanged = httpx.get(f"{b}/v1/checkpoints/1/file", headers={"If-None-Match": from_a.headers["etag"]})
    assert unchanged.status_code == 304
