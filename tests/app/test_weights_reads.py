"""Reading weights cheaply: the document is cached in each API process and dropped when the trainer
announces a new one; ETag / If-None-Match answer 304 while it is unchanged; ``?ids=`` is one round trip."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from fastapi.testclient import TestClient
from published_weights import trainer_feed, weights_doc

from store.config import Settings


def gets_served_by_redis(redis_url: str) -> int:
    stats = redis.Redis.from_url(redis_url).info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


def wait_for_step(client: TestClient, step: int, within_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if client.get("/v1/weights").json()["step"] == step:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"step {step} not served within {within_s} s")


def test_an_unchanged_document_answers_304_to_its_etag_and_a_new_one_200(
    app_client: TestClient, redis_url: str
) -> None:
    feed = trainer_feed(redis_url)
    feed.publish_weights(weights_doc(1), [], [])
    wait_for_step(app_client, 1, within_s=2)

    first = app_client.get("/v1/weights")
    etag = first.headers["etag"]
    again = app_client.get("/v1/weights", headers={"If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    weak = app_client.get("/v1/weights", headers={"If-None-Match": f'"other", W/{etag}'})
    assert weak.status_code == 304

    feed.publish_weights(weights_doc(2), [], [])
    wait_for_step(app_client, 2, within_s=2)
    changed = app_client.get("/v1/weights", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["step"] == 2
    assert changed.headers["etag"] != etag


def test_reads_between_publications_come_from_memory_and_a_publication_is_seen_at_once(
    app_client: TestClient, redis_url: str
) -> None:
    feed = trainer_feed(redis_url)
    feed.publish_weights(weights_doc(1), [], [])
    wait_for_step(app_client, 1, within_s=2)

    before = gets_served_by_redis(redis_url)
    for _ in range(50):
        assert app_client.get("/v1/weights").json() == weights_doc(1)
    assert gets_served_by_redis(redis_url) - before <= 1  # one refresh at most (the cache's age limit)

    feed.publish_weights(weights_doc(2), [], [])
    # the announcement drops the cached copy: far sooner than the cache's 5 s age limit
    assert wait_for_step(app_client, 2, within_s=1.0) < 1.0


def test_weights_of_ids_skip_unknown_repeated_and_empty_ids_and_bound_their_length(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient], redis_url: str
) -> None:
    client = make_client(make_settings(model="mlp", model_params={"n_features": 2, "n_classes": 3}))
    samples = [{"id": f"s{i}", "source": "a", "input": [i, 1], "target": 0} for i in range(3)]
    assert client.post("/v1/samples", json={"samples": samples}).status_code == 202
    unweighted = client.get("/v1/weights/samples", params={"ids": "s0,,s0,nope,s2"}).json()
    assert unweighted == {"step": 0, "weights": {"s0": 1.0, "s2": 1.0}}

    trainer_feed(redis_url).publish_weights(weights_doc(7), ordinals=[1, 2, 3], weights=[0.125, 2.5, 1e-7])
    got = client.get("/v1/weights/samples", params={"ids": "s2,s1,s0"})
    assert got.json() == {"step": 7, "weights": {"s2": 1e-7, "s1": 2.5, "s0": 0.125}}

    too_long = client.get("/v1/weights/samples", params={"ids": "s0," + "x" * 129})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "ids"
    too_many = client.get("/v1/weights/samples", params={"ids": ",".join(["s0"] * 10_001)})
    assert too_many.status_code == 422 and "at most 10000 ids" in too_many.json()["error"]["detail"]
