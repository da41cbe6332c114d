"""A buffer sharded over 4 hash tags (``DATADIET_BUFFER_SHARDS=4``) on one redis-server: per-shard keys and
ordinals, dedup across requests, all-or-nothing ingest when one shard fails, per-shard eviction, the
trainer's feed over every shard's stream, and fencing of a stale trainer on a shard's priority zset."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import pytest
import redis

from store.feed import TrainerFeed
from store.keys import SHARD_BITS, Keys, shard_of, shard_of_ordinal
from store.lease import LeaseLost
from tests.store.conftest import record

T = TypeVar("T")
SHARDS = 4
KEYS = Keys("dd", SHARDS)


@pytest.fixture
def on_buffer(buffer_call: Callable[..., Any]) -> Callable[..., Any]:
    """``on_buffer(lambda buffer: ..., capacity=...)``: one call on a fresh SampleBuffer of KEYS."""
    return lambda use, capacity=1000: buffer_call(KEYS, use, capacity)


def shard_sizes(r: redis.Redis) -> list[int]:
    return [int(r.hlen(sk.samples)) for sk in KEYS.all_shards()]


def test_shard_of_is_crc32_of_the_id_mod_shards() -> None:
    # pinned values: a release that changed the hash would strand every stored id on the wrong shard
    assert [shard_of(f"s{i}", 4) for i in range(8)] == [2, 0, 2, 0, 3, 1, 3, 1]
    assert shard_of("agent-7:42", 16) == 942724217 % 16
    assert shard_of("anything", 1) == 0
    with pytest.raises(ValueError):
        Keys("dd", SHARDS).ids  # noqa: B018  a per-shard key needs its shard


def test_samples_land_on_their_shards_keys_with_the_shard_in_the_ordinals_top_bits(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    result = on_buffer(lambda b: b.ingest([record(i) for i in range(200)]))

    assert (result.accepted, result.duplicates, result.evicted) == (200, 0, 0)
    assert sum(shard_sizes(redis_client)) == 200 and min(shard_sizes(redis_client)) > 20
    assert not redis_client.exists("{dd}:samples", "{dd}:ids", "{dd}:seq", "{dd}:ingest")
    for i in range(200):
        s = shard_of(f"s{i}", SHARDS)
        ordinal = int(redis_client.hget(KEYS.for_shard(s).ids, f"s{i}"))
        assert shard_of_ordinal(ordinal) == s and ordinal & ((1 << SHARD_BITS) - 1) >= 1
    stats = on_buffer(lambda b: b.stats())
    assert stats["buffer"]["size"] == 200 and stats["buffer"]["ingested"] == 200
    doc = on_buffer(lambda b: b.get("s17"))
    assert doc is not None and doc["id"] == "s17" and doc["weight"] == 1.0


def test_dedup_holds_across_requests_and_shards(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    on_buffer(lambda b: b.ingest([record(i) for i in range(100)]))

    again = on_buffer(lambda b: b.ingest([record(i) for i in range(90, 110)] + [record(95)]))

    assert (again.accepted, again.duplicates) == (10, 11)
    assert again.flags == [False] * 10 + [True] * 10 + [False]
    stats = on_buffer(lambda b: b.stats())["buffer"]
    assert (stats["size"], stats["ingested"], stats["duplicates"]) == (110, 110, 11)


def test_a_request_that_fails_on_one_shard_leaves_nothing_on_the_others(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    on_buffer(lambda b: b.ingest([record(i) for i in range(40)]))
    feed = TrainerFeed(redis_client, KEYS)
    feed.ensure_group()
    before = {e.ordinal for e in feed.read_new(1000)}
    broken = KEYS.for_shard(2)
    redis_client.delete(broken.ids)
    redis_client.set(broken.ids, "not a hash")  # shard 2's INGEST fails at its first command (WRONGTYPE)
    request = [record(i) for i in range(100, 160)]
    assert {shard_of(r.id, SHARDS) for r in request} == set(range(SHARDS))

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        on_buffer(lambda b: b.ingest(request))

    for sk in KEYS.all_shards():
        if sk.shard != 2:
            assert not any(redis_client.hexists(sk.ids, r.id) for r in request)
    stats = on_buffer(lambda b: b.stats())["buffer"]
    assert (stats["size"], stats["ingested"], stats["duplicates"]) == (40, 40, 0)
    # the stream entries the failed request left are matched by evictions entries: a trainer drops them
    read = [e.ordinal for e in feed.read_new(1000)]
    undone = set()
    for s in range(SHARDS):
        _, ordinals, complete = feed.evictions(("0-0", 0), shard=s)
        assert complete
        undone |= set(ordinals)
    assert read and set(read) == undone and not (undone & before)
    # with the shard repaired, the same request is stored whole, with the counts of a first attempt
    redis_client.delete(broken.ids)
    for o in before:
        if shard_of_ordinal(o) == 2:
            payload = redis_client.hget(broken.samples, o)
            redis_client.hset(broken.ids, orjson.loads(payload)["id"], o)
    retry = on_buffer(lambda b: b.ingest(request))
    assert (retry.accepted, retry.duplicates) == (60, 0)


def test_each_shard_evicts_down_to_its_share_of_the_capacity(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    for start in range(0, 400, 100):
        on_buffer(
            lambda b, start=start: b.ingest([record(i) for i in range(start, start + 100)]), capacity=40
        )

    assert shard_sizes(redis_client) == [10] * SHARDS
    stats = on_buffer(lambda b: b.stats(), capacity=40)["buffer"]
    assert (stats["size"], stats["evicted"]) == (40, 360)
    # per shard, the oldest never-weighted samples went first: the newest 10 of each shard are kept
    for s, sk in enumerate(KEYS.all_shards()):
        mine = [i for i in range(400) if shard_of(f"s{i}", SHARDS) == s]
        assert {k.decode() for k in redis_client.hkeys(sk.ids)} == {f"s{i}" for i in mine[-10:]}


def test_the_trainer_reads_every_shard_and_its_weights_are_served(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    on_buffer(lambda b: b.ingest([record(i) for i in range(100)]))
    feed = TrainerFeed(redis_client, KEYS)
    feed.ensure_group()

    entries = feed.read_new(1000, block_ms=100)
    assert len(entries) == 100 and {e.shard for e in entries} == set(range(SHARDS))
    assert all(shard_of_ordinal(e.ordinal) == e.shard for e in entries)
    payloads = feed.fetch([e.ordinal for e in entries])
    ordinal_of = {p["id"]: e.ordinal for p, e in zip(payloads, entries, strict=True) if p}
    assert set(ordinal_of) == {f"s{i}" for i in range(100)}
    assert all(shard_of(i, SHARDS) == shard_of_ordinal(o) for i, o in ordinal_of.items())
    weights = [0.5 + int(i[1:]) / 100 for i in ordinal_of]
    feed.publish_weights({"step": 7}, list(ordinal_of.values()), weights)

    step, members = on_buffer(lambda b: b.weights_of("s3,s50,s99,nope,s3"))
    got = orjson.loads(b"{" + members + b"}")
    assert step == 7 and got == {"s3": 0.53, "s50": 1.0, "s99": 1.49}
    lowest = on_buffer(lambda b: b.ranked("asc", 3))
    assert [d["id"] for d in lowest] == ["s0", "s1", "s2"]
    highest = on_buffer(lambda b: b.ranked("desc", 2))
    assert [d["id"] for d in highest] == ["s99", "s98"]
    # acknowledged entries are per shard stream
    for s in range(SHARDS):
        feed.ack([e.entry_id for e in entries if e.shard == s], s)
    assert all(redis_client.xpending(sk.ingest, "trainer")["pending"] == 0 for sk in KEYS.all_shards())


def test_a_stale_trainer_cannot_write_a_shards_priority_zset(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    on_buffer(lambda b: b.ingest([record(i) for i in range(20)]))
    ordinals = [
        int(redis_client.hget(KEYS.for_shard(shard_of(f"s{i}", SHARDS)).ids, f"s{i}")) for i in range(20)
    ]
    stale = TrainerFeed(redis_client, KEYS, "trainer-a", lease_ttl_s=0.2)
    assert stale.lease.acquire(wait=False)
    stale.publish_weights({"step": 1}, ordinals, [0.5] * 20)
    time.sleep(0.3)  # paused past its lease ...
    successor = TrainerFeed(redis_client, KEYS, "trainer-b", lease_ttl_s=30)
    assert successor.lease.acquire(wait=False)  # ... which a successor took (and claimed every shard with)

    # the stale one still believes it holds the lease; the global check would refuse its status, and every
    # shard refuses its token, before it writes a thing
    with pytest.raises(LeaseLost):
        stale.lease.fenced_shard(
            stale._shard_ranks, KEYS.for_shard(1), [KEYS.for_shard(1).priority], [9.0, ordinals[0]]
        )
    stale.lease.value = "1 still-me 1"  # as if it never noticed: it goes on to publish
    with pytest.raises(LeaseLost):
        stale.publish_weights({"step": 2}, ordinals, [9.0] * 20)
    scores = {redis_client.zscore(KEYS.for_shard(shard_of_ordinal(o)).priority, o) for o in ordinals}
    assert scores == {0.5}
    successor.publish_weights({"step": 3}, ordinals, [2.0] * 20)
    assert {redis_client.zscore(KEYS.for_shard(shard_of_ordinal(o)).priority, o) for o in ordinals} == {2.0}


def test_quarantine_moves_samples_out_of_their_shards_and_the_api_lists_them_newest_first(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    on_buffer(lambda b: b.ingest([record(i) for i in range(40)]))
    feed = TrainerFeed(redis_client, KEYS)
    bad = [f"s{i}" for i in (1, 2, 4, 5, 6)]  # shards 0, 2, 3 and 1 (test_shard_of_is_crc32...)
    ordinals = [int(redis_client.hget(KEYS.for_shard(shard_of(i, SHARDS)).ids, i)) for i in bad]

    assert feed.quarantine(ordinals, ["agent-a"] * 5, ["loss is not finite (nan)"] * 5, step=3) == 5

    assert all(on_buffer(lambda b, i=i: b.get(i)) is None for i in bad)
    listed = on_buffer(lambda b: b.quarantined(10))
    assert sorted(q["id"] for q in listed) == sorted(bad) and listed[0]["step"] == 3
    assert [q["quarantined_at"] for q in listed] == sorted(
        (q["quarantined_at"] for q in listed), reverse=True
    )
    stats = on_buffer(lambda b: b.stats())["buffer"]
    assert (stats["size"], stats["quarantined"]) == (35, 5)
    assert on_buffer(lambda b: b.quarantined(2))[0] == listed[0]


def test_a_shard_that_cannot_be_claimed_does_not_stop_a_trainer_from_taking_the_lease(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.hset(KEYS.for_shard(2).fence_seen, "not", "a string")  # shard 2's claim fails (WRONGTYPE)
    feed = TrainerFeed(redis_client, KEYS)

    assert feed.lease.acquire(wait=False)

    assert "could not claim shard 2" in caplog.text
    assert [redis_client.get(KEYS.for_shard(s).fence_seen) for s in (0, 1, 3)] == [b"1"] * 3
