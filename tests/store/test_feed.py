"""``store.feed.TrainerFeed``: the trainer's at-least-once view of the ingest stream (a consumer group)."""

from __future__ import annotations

import asyncio
import time

import orjson
import redis
import redis.asyncio as aioredis

from store.buffer import SampleBuffer, SampleRecord
from store.feed import StreamEntry, TrainerFeed
from store.keys import Keys


def record(i: int) -> SampleRecord:
    source = f"agent-{i % 3}"
    doc = {"id": f"s{i}", "source": source, "input": f"q{i}", "target": f"a{i}"}
    return SampleRecord(f"s{i}", source, f"{i:016x}", orjson.dumps(doc))


def ingest(redis_url: str, ids: range | list[int], capacity: int = 100_000) -> int:
    """Ingest samples ``s<i>`` through the API's SampleBuffer; returns how many were accepted."""

    async def run() -> int:
        client = aioredis.Redis.from_url(redis_url)
        try:
            buffer = SampleBuffer(client, Keys(), capacity, validation_max=10)
            return (await buffer.ingest([record(i) for i in ids])).accepted
        finally:
            await client.aclose()

    return asyncio.run(run())


def feed(r: redis.Redis, consumer: str = "trainer-0") -> TrainerFeed:
    f = TrainerFeed(r, Keys(), consumer)
    f.ensure_group()
    return f


def read_all_new(f: TrainerFeed, chunk: int = 64) -> list[StreamEntry]:
    out: list[StreamEntry] = []
    while batch := f.read_new(chunk):
        out += batch
    return out


def test_a_consumer_sees_every_accepted_sample_exactly_once(
    redis_url: str, redis_client: redis.Redis
) -> None:
    accepted = ingest(redis_url, range(100)) + ingest(redis_url, range(50, 250))  # 50 duplicates
    trainer = feed(redis_client)  # the group is created after ingestion: earlier samples still count

    entries = read_all_new(trainer)

    assert accepted == 250
    assert len(entries) == len({e.ordinal for e in entries}) == accepted
    payloads = trainer.fetch([e.ordinal for e in entries])
    assert sorted(p["id"] for p in payloads if p) == sorted(f"s{i}" for i in range(250))
    assert all(p is not None and p["source"] == e.source for e, p in zip(entries, payloads, strict=True))
    assert read_all_new(trainer) == []


def test_samples_accepted_while_reading_are_delivered_too(redis_url: str, redis_client: redis.Redis) -> None:
    trainer = feed(redis_client)
    ingest(redis_url, range(10))
    first = read_all_new(trainer)

    ingest(redis_url, range(10, 15))

    assert [e.ordinal for e in first] == list(range(1, 11))
    assert [e.ordinal for e in read_all_new(trainer)] == list(range(11, 16))


def test_entries_a_dead_consumer_never_acked_are_claimed_by_another(
    redis_url: str, redis_client: redis.Redis
) -> None:
    ingest(redis_url, range(10))
    dead = feed(redis_client, "trainer-dead")
    delivered = dead.read_new(10)
    dead.ack([e.entry_id for e in delivered[:4]])
    survivor = feed(redis_client, "trainer-new")

    assert survivor.claim_stale(min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.05)
    claimed = survivor.claim_stale(min_idle_ms=20)

    assert [e.ordinal for e in claimed] == [e.ordinal for e in delivered[4:]]
    survivor.ack([e.entry_id for e in claimed])
    assert redis_client.xpending(Keys().ingest, "trainer")["pending"] == 0


def test_a_restarted_consumer_gets_its_unacked_entries_back(
    redis_url: str, redis_client: redis.Redis
) -> None:
    ingest(redis_url, range(15))
    before = feed(redis_client, "trainer-0")
    delivered = before.read_new(10)
    before.ack([e.entry_id for e in delivered[:4]])

    after = feed(redis_client, "trainer-0")  # same name, new process

    assert after.read_pending(100) == delivered[4:]
    assert [e.ordinal for e in read_all_new(after)] == list(range(11, 16))


def test_acked_entries_are_not_redelivered(redis_url: str, redis_client: redis.Redis) -> None:
    ingest(redis_url, range(20))
    trainer = feed(redis_client)
    trainer.ack([e.entry_id for e in read_all_new(trainer)])
    ingest(redis_url, range(20))  # all duplicates: no new entries

    other = feed(redis_client, "trainer-1")
    assert trainer.read_pending(100) == []
    assert read_all_new(trainer) == []
    assert other.claim_stale(min_idle_ms=0) == []


def test_trim_acknowledged_drops_acked_entries_and_keeps_unacked_ones(
    redis_url: str, redis_client: redis.Redis
) -> None:
    ingest(redis_url, range(500))
    trainer = feed(redis_client)
    entries = read_all_new(trainer, chunk=500)
    trainer.ack([e.entry_id for e in entries[:400]])

    trainer.trim_acknowledged()

    assert redis_client.xlen(Keys().ingest) < 500  # whole stream nodes below the first unacked entry went
    assert trainer.read_pending(500) == entries[400:]

    trainer.ack([e.entry_id for e in entries[400:]])
    trainer.trim_acknowledged()
    assert redis_client.xlen(Keys().ingest) == 0  # everything acknowledged: every node is below the cut

    ingest(redis_url, range(500, 510))
    assert [e.ordinal for e in read_all_new(trainer)] == list(range(501, 511))


def test_fetch_returns_none_for_evicted_samples(redis_url: str, redis_client: redis.Redis) -> None:
    ingest(redis_url, range(12), capacity=10)  # ordinals 1, 2 evicted
    trainer = feed(redis_client)

    ordinals = [e.ordinal for e in read_all_new(trainer)]
    payloads = trainer.fetch(ordinals)

    assert ordinals == list(range(1, 13))  # the stream still names evicted samples...
    assert payloads[:2] == [None, None]  # ...whose payloads are gone
    assert [p["id"] for p in payloads[2:] if p] == [f"s{i}" for i in range(2, 12)]
    assert trainer.live_ordinals([1, 3]) == [False, True]


def test_the_trainer_reads_what_the_buffer_evicted_from_a_stream_and_notices_when_it_fell_behind(
    redis_client: redis.Redis,
) -> None:
    """Evictions are read from the stream the ingest script writes (O(evicted)), not by asking about every
    sample; a reader whose unread entries were trimmed is told to check everything instead."""
    import asyncio

    import redis.asyncio as aioredis

    from app.schema import to_record
    from store.buffer import SampleBuffer

    url = redis_client.connection_pool.connection_kwargs
    client_url = f"redis://{url['host']}:{url['port']}/{url.get('db', 0)}"

    async def post(ids: range) -> None:
        client = aioredis.Redis.from_url(client_url)
        try:
            buffer = SampleBuffer(client, Keys(), 5, 10)
            for i in ids:  # one request each: each over capacity evicts the oldest
                await buffer.ingest(
                    [to_record({"id": f"s{i}", "source": "a", "input": f"{i}", "target": "x"})]
                )
        finally:
            await client.aclose()

    feed = TrainerFeed(redis_client, Keys())
    start = feed.eviction_head()
    asyncio.run(post(range(8)))  # 8 into a buffer of 5: ordinals 1, 2, 3 evicted, one entry each
    at, ordinals, complete = feed.evictions(start)
    assert (ordinals, complete) == ([1, 2, 3], True)
    assert feed.evictions(at)[1:] == ([], True)  # nothing new
    asyncio.run(post(range(8, 9)))  # evicts ordinal 4: entry 4 ...
    redis_client.xtrim(Keys().evictions, maxlen=0)  # ... which the stream's cap trims before it is read
    asyncio.run(post(range(9, 10)))
    _, ordinals, complete = feed.evictions(at)
    assert complete is False and ordinals == [5]  # entry 4 (ordinal 4) is gone: a full check is due
