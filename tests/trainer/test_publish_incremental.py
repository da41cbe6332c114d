"""Publishing is proportional to what changed (issue 14): only per-sample weights that moved by more than
the tolerance are rewritten in Redis, at most ``max_rows`` a publish (largest moves first), and a restarted
trainer (a table loaded from its state) publishes everything again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import redis

from store.feed import TrainerFeed
from store.keys import Keys
from trainer.publish import Publisher
from trainer.table import WeightTable

N = 1000


def setup(redis_client: redis.Redis, tmp_path: Path, **kw: float) -> tuple[WeightTable, Publisher]:
    keys = Keys()
    redis_client.zadd(keys.priority, {str(o): 1e12 + o for o in range(1, N + 1)})  # as ingest leaves them
    feed = TrainerFeed(redis_client, keys)
    assert feed.lease.acquire(wait=False)
    table = WeightTable()
    table.add(np.arange(1, N + 1), np.arange(N, dtype=np.uint64), [f"s{i % 3}" for i in range(N)])
    table.cols["weight"][:N] = np.random.default_rng(0).gamma(2.0, 0.5, N)
    return table, Publisher(feed, None, tmp_path, 2.0, **kw)  # type: ignore[arg-type]


def in_redis(redis_client: redis.Redis) -> np.ndarray:
    pairs = redis_client.zrange(Keys().priority, 0, -1, withscores=True)
    out = np.zeros(N)
    for member, score in pairs:
        out[int(member) - 1] = score
    return out


def test_only_weights_that_moved_beyond_the_tolerance_are_rewritten(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    table, pub = setup(redis_client, tmp_path, tolerance=0.01)
    pub.publish_weights(table, 1, "bilevel", {})
    assert pub.last_written == N
    np.testing.assert_allclose(in_redis(redis_client), table.weight, rtol=1e-6)

    pub.publish_weights(table, 2, "bilevel", {})
    assert pub.last_written == 0  # nothing moved: nothing written

    w = table.cols["weight"]
    w[:100] *= 1.5  # moved
    w[100:200] *= 1.001  # within the tolerance
    before = in_redis(redis_client)
    pub.publish_weights(table, 3, "bilevel", {})
    assert pub.last_written == 100
    after = in_redis(redis_client)
    np.testing.assert_allclose(after[:100], w[:100], rtol=1e-6)
    np.testing.assert_array_equal(after[100:], before[100:])
    assert redis_client.hget(Keys().trainer, "weights_written") == b"100"
    # what the API serves stays within the tolerance of the trainer's weights
    assert np.all(np.abs(after - w[:N]) <= 0.01 * np.maximum(after, w[:N]) + 1e-12)


def test_a_publish_writes_at_most_max_rows_largest_moves_first(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    table, pub = setup(redis_client, tmp_path, max_rows=300)
    for _ in range(4):  # the first publish of a table is spread over ceil(N / max_rows) publishes
        pub.publish_weights(table, 1, "bilevel", {})
    assert pub.last_written == N - 3 * 300
    pub.publish_weights(table, 1, "bilevel", {})
    assert pub.last_written == 0

    w = table.cols["weight"]
    w[:500] *= 1.1
    w[500:] *= 3.0  # the larger moves go first
    pub.publish_weights(table, 2, "bilevel", {})
    after = in_redis(redis_client)
    assert pub.last_written == 300
    assert np.sum(np.isclose(after[500:], w[500:N], rtol=1e-6)) == 300


def test_a_table_restored_from_its_state_publishes_every_row_again(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    table, pub = setup(redis_client, tmp_path)
    pub.publish_weights(table, 1, "bilevel", {})
    restored = WeightTable.from_state(*table.state())
    redis_client.zadd(Keys().priority, {str(o): 1e12 + o for o in range(1, N + 1)})  # Redis lost them
    pub.publish_weights(restored, 2, "bilevel", {})
    assert pub.last_written == N
    np.testing.assert_allclose(in_redis(redis_client), table.weight, rtol=1e-6)
