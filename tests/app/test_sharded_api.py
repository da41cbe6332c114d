"""The HTTP API on a buffer sharded over 4 hash tags (``DATADIET_BUFFER_SHARDS=4``, one redis-server): the
same answers as with one shard, from samples spread over every shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from published_weights import weights_doc

from store.feed import TrainerFeed
from store.keys import Keys, ShardsMismatch, shard_of_ordinal

KEYS = Keys("dd", 4)


def sample(i: int) -> dict[str, Any]:
    return {"id": f"s{i}", "source": "odd" if i % 2 else "even", "input": f"{i}+1=", "target": f"{i + 1}"}


def test_a_sharded_buffer_serves_samples_weights_rankings_and_stats(
    redis_url: str, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    api = make_client(make_settings(buffer_shards=4))
    posted = api.post("/v1/samples", json={"samples": [sample(i) for i in range(60)]})
    assert posted.status_code == 202 and posted.json()["accepted"] == 60
    again = api.post("/v1/samples", json={"samples": [sample(i) for i in range(55, 65)]}).json()
    assert (again["accepted"], again["duplicates"]) == (5, 5)
    assert again["ids"] == [f"s{i}" for i in range(55, 65)]

    r = redis.Redis.from_url(redis_url)
    ordinal_of = {
        f"s{i}": int(r.hget(KEYS.for_shard(KEYS.shard_of(f"s{i}")).ids, f"s{i}")) for i in range(65)
    }
    assert {shard_of_ordinal(o) for o in ordinal_of.values()} == {0, 1, 2, 3}
    feed = TrainerFeed(r, KEYS)
    assert feed.lease.acquire(wait=False)
    weighted = [f"s{i}" for i in range(40)]  # the rest stay never-weighted (weight 1)
    feed.publish_weights(weights_doc(5), [ordinal_of[i] for i in weighted], [(2 + i) / 20 for i in range(40)])

    got = api.get("/v1/weights/samples", params={"ids": "s0,s39,s50,nope,s0"}).json()
    assert got == {"step": 5, "weights": {"s0": 0.1, "s39": 2.05, "s50": 1.0}}
    lowest = api.get("/v1/weights/samples", params={"order": "asc", "limit": 3}).json()
    assert lowest["weights"] == {"s0": 0.1, "s1": 0.15, "s2": 0.2}
    highest = api.get("/v1/weights/samples", params={"order": "desc", "limit": 2}).json()
    assert highest["weights"] == {"s39": 2.05, "s38": 2.0}
    doc = api.get("/v1/samples/s39").json()
    assert (doc["id"], doc["weight"], doc["target"]) == ("s39", 2.05, "40")
    assert api.get("/v1/samples/s99").status_code == 404
    stats = api.get("/v1/stats").json()["buffer"]
    assert (stats["size"], stats["ingested"], stats["duplicates"]) == (65, 65, 5)
    assert api.get("/readyz").status_code == 200


def test_processes_that_disagree_on_the_shard_count_refuse_instead_of_losing_samples(
    redis_url: str, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    """The first process to store records the buffer's shard count. An API with another
    DATADIET_BUFFER_SHARDS would store samples no trainer reads and read an empty buffer, so it answers
    503 naming the setting, stores nothing and is not ready, whichever way round (4 then 1, 1 then 4, and
    a one-shard buffer from before the count was recorded); the trainer's feed refuses the same way
    (tests/trainer: it exits 78)."""
    r = redis.Redis.from_url(redis_url)
    four = make_client(make_settings(buffer_shards=4))
    assert four.post("/v1/samples", json={"samples": [sample(i) for i in range(8)]}).status_code == 202
    one = make_client(make_settings(buffer_shards=1))
    refused = one.post("/v1/samples", json={"samples": [sample(100)]})
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert "DATADIET_BUFFER_SHARDS=1" in refused.json()["error"]["detail"]
    assert "split over 4 shard(s)" in refused.json()["error"]["detail"]
    assert r.hget(Keys().ids, "s100") is None and not r.exists(Keys().samples)
    # nor does it read an empty buffer as if the samples were gone: every buffer route refuses, and it is
    # not ready (a load balancer stops sending it traffic)
    for path in ("/v1/stats", "/v1/weights", "/v1/samples/s1", "/v1/weights/samples?ids=s1,s2", "/metrics"):
        answer = one.get(path)
        assert answer.status_code == 503 and "DATADIET_BUFFER_SHARDS=1" in answer.text, (path, answer.text)
    ready = one.get("/readyz")
    assert ready.status_code == 503 and "DATADIET_BUFFER_SHARDS=1" in ready.json()["error"]["checks"]["redis"]
    assert four.get("/readyz").status_code == 200 and four.get("/v1/stats").json()["buffer"]["size"] == 8
    with pytest.raises(ShardsMismatch, match="DATADIET_BUFFER_SHARDS=1"):
        TrainerFeed(r, Keys("dd", 1)).ensure_group()
    TrainerFeed(r, KEYS).ensure_group()  # the trainer that agrees starts

    r.flushall()  # a one-shard buffer written before the count was recorded (an older release)
    assert one.post("/v1/samples", json={"samples": [sample(1)]}).status_code == 202
    r.delete(Keys().layout)
    fresh_four = make_client(make_settings(buffer_shards=4))
    assert fresh_four.post("/v1/samples", json={"samples": [sample(2)]}).status_code == 503
    assert r.get(Keys().layout) is None  # the refusal records nothing
    assert (
        make_client(make_settings(buffer_shards=1))
        .post("/v1/samples", json={"samples": [sample(3)]})
        .status_code
        == 202
    )
    assert r.get(Keys().layout) == b"1"
