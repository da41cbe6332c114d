"""The HTTP API on a buffer sharded over 4 hash tags (``DATADIET_BUFFER_SHARDS=4``, one redis-server): the
same answers as with one shard, from samples spread over every shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from fastapi.testclient import TestClient
from published_weights import weights_doc

from store.feed import TrainerFeed
from store.keys import Keys, shard_of_ordinal

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
