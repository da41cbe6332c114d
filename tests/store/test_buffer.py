"""``store.buffer.SampleBuffer``: atomic ingest with dedup, counters, and eviction down to capacity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import pytest
import redis

from store.buffer import IngestResult, SampleRecord
from store.feed import TrainerFeed
from store.keys import Keys
from tests.store.conftest import record

T = TypeVar("T")


@pytest.fixture
def on_buffer(buffer_call: Callable[..., Any]) -> Callable[..., Any]:
    """``on_buffer(lambda buffer: ..., capacity=...)``: one call on a fresh SampleBuffer of Keys()."""
    return lambda use, capacity=1000: buffer_call(Keys(), use, capacity)


def ingest(on_buffer: Callable[..., Any], records: list[SampleRecord], capacity: int = 1000) -> IngestResult:
    result: IngestResult = on_buffer(lambda b: b.ingest(records), capacity=capacity)
    return result


def stored_ids(r: redis.Redis) -> set[str]:
    return {k.decode() for k in r.hkeys(Keys().ids)}


def test_ingest_stores_new_ids_and_flags_duplicates_in_request_order(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    ingest(on_buffer, [record(1)])

    result = ingest(on_buffer, [record(0), record(1), record(2), record(0)])

    assert (result.accepted, result.duplicates, result.evicted) == (2, 2, 0)
    assert result.flags == [True, False, True, False]
    assert stored_ids(redis_client) == {"s0", "s1", "s2"}
    stats = on_buffer(lambda b: b.stats())["buffer"]
    assert (stats["size"], stats["ingested"], stats["duplicates"]) == (3, 3, 2)


def test_stored_sample_reads_back_with_uniform_weight_until_the_trainer_weights_it(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    ingest(on_buffer, [record(0), record(1)])
    assert on_buffer(lambda b: b.get("s1")) == {**orjson.loads(record(1).payload), "weight": 1.0}

    feed = TrainerFeed(redis_client, Keys())
    feed.publish_weights({"step": 1}, ordinals=[1, 2], weights=[0.25, 3.0])

    step, members = on_buffer(lambda b: b.weights_of("s0,s1,unknown,,s1"))
    assert (step, orjson.loads(b"{" + members + b"}")) == (1, {"s0": 0.25, "s1": 3.0})
    assert on_buffer(lambda b: b.get("unknown")) is None


def test_a_full_buffer_evicts_the_oldest_never_weighted_samples(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    result = ingest(on_buffer, [record(i) for i in range(25)], capacity=10)

    assert (result.accepted, result.evicted) == (25, 15)
    assert stored_ids(redis_client) == {f"s{i}" for i in range(15, 25)}
    stats = on_buffer(lambda b: b.stats(), capacity=10)["buffer"]
    assert (stats["size"], stats["ingested"], stats["evicted"]) == (10, 25, 15)


def test_an_evicted_id_is_accepted_again_as_a_new_sample(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    ingest(on_buffer, [record(i) for i in range(12)], capacity=10)  # s0, s1 evicted

    result = ingest(on_buffer, [record(0)], capacity=10)

    assert (result.accepted, result.duplicates, result.evicted) == (1, 0, 1)
    assert "s0" in stored_ids(redis_client)
    assert "s2" not in stored_ids(redis_client)  # now the oldest, so the one to make room


def test_lowest_published_weights_are_evicted_first(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    ingest(on_buffer, [record(i) for i in range(10)], capacity=10)  # ordinals 1..10
    weights = [1.5, 0.1, 2.0, 0.05, 1.0, 0.9, 3.0, 0.2, 1.1, 0.7]  # s3 < s1 < s7 lowest
    TrainerFeed(redis_client, Keys()).publish_weights({"step": 1}, list(range(1, 11)), weights)

    result = ingest(on_buffer, [record(i) for i in range(10, 13)], capacity=10)

    assert result.evicted == 3
    assert stored_ids(redis_client) == {f"s{i}" for i in range(13)} - {"s3", "s1", "s7"}


def test_published_weights_never_bring_back_an_evicted_sample(
    on_buffer: Callable[..., Any], redis_client: redis.Redis
) -> None:
    ingest(on_buffer, [record(i) for i in range(12)], capacity=10)  # ordinals 1, 2 evicted

    TrainerFeed(redis_client, Keys()).publish_weights({"step": 1}, list(range(1, 13)), [1.0] * 12)

    assert redis_client.zcard(Keys().priority) == 10
    assert redis_client.zscore(Keys().priority, "1") is None
