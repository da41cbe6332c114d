"""Publish a weights document the way the trainer does (through ``TrainerFeed`` under the lease), without a
trainer. ``from published_weights import trainer_feed, weights_doc`` (``tests/app`` is on ``sys.path``)."""

from __future__ import annotations

from typing import Any

import redis

from store.feed import TrainerFeed
from store.keys import Keys


def weights_doc(step: int, count: int = 2) -> dict[str, Any]:
    """A weights document of ``count`` samples of one source ``a``, at ``step``."""
    hist = {"edges": [0.0, 4.000000001], "counts": [count]}
    summary = {"count": count, "effective_fraction": 1.0, "mean": 1.0, "histogram": hist}
    return {
        "step": step,
        "updated_at": "2026-01-01T00:00:00+00:00",
        "sources": {"a": 1.0},
        "summary": summary,
    }


def trainer_feed(redis_url: str) -> TrainerFeed:
    """A feed on the default prefix holding the trainer lease."""
    feed = TrainerFeed(redis.Redis.from_url(redis_url), Keys())
    assert feed.lease.acquire(wait=False)
    return feed
