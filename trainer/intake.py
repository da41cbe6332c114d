"""Stream intake: new samples from the ingest stream into the weight table, and their payloads.

Delivery is at-least-once (store/feed.py): an entry joins the table when it is read and is acknowledged
only once a checkpoint holding that table is on disk, so a crash re-delivers what the last checkpoint
did not hold. Payloads are fetched from Redis by ordinal and kept in an LRU cache; while Redis is
unavailable the trainer goes on with what the cache holds (``MISSING`` marks the rest).

A new sample joins the unscored queue with its arrival time: its stream entry id's milliseconds, which
Redis sets when the ingest script XADDs it (``<ms>-<seq>``, https://redis.io/docs/latest/develop/data-types/streams/#entry-ids),
i.e. when the API accepted the POST. The loop measures freshness from it (trainer/metrics.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from store.feed import StreamEntry, TrainerFeed
from trainer.outage import REDIS_ERRORS, Dependency
from trainer.settings import TrainerSettings
from trainer.table import WeightTable

MISSING = object()  # a payload not fetched this time (Redis unavailable): skip the row, do not kill it


class PayloadCache:
    """Sample payloads by ordinal, fetched from Redis in batches, least recently used dropped first."""

    def __init__(self, feed: TrainerFeed, size: int, redis_dep: Dependency | None = None) -> None:
        self.feed, self.size = feed, size
        self.redis = redis_dep or Dependency("redis", REDIS_ERRORS)
        self.items: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def get(self, ordinals: np.ndarray) -> list[Any]:
        """Payloads in order: a dict, None where the sample was evicted, or MISSING where it is not cached
        and Redis is unavailable (the trainer goes on with what it holds)."""
        out: list[Any] = [None] * len(ordinals)
        missing = []
        for j, o in enumerate(ordinals.tolist()):
            hit = self.items.get(o)
            if hit is None:
                missing.append(j)
            else:
                self.items.move_to_end(o)
                out[j] = hit
        if missing:
            ok, fetched = self.redis.attempt(lambda: self.feed.fetch([int(ordinals[j]) for j in missing]))
            if not ok or fetched is None:
                for j in missing:
                    out[j] = MISSING
                return out
            for j, doc in zip(missing, fetched, strict=True):
                out[j] = doc
                if doc is not None and self.size:
                    self.items[int(ordinals[j])] = doc
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return out


class Intake:
    """The ingest stream's consumer: entries into the table, evictions out of it, acks after checkpoints."""

    def __init__(self, feed: TrainerFeed, settings: TrainerSettings, redis_dep: Dependency) -> None:
        self.feed, self.settings = feed, settings
        self.cache = PayloadCache(feed, settings.payload_cache, redis_dep)
        shards = feed.k.shards
        # per shard (entry ids are per stream): entry ids in the table but not yet in a saved checkpoint
        self.unacked: list[list[str]] = [[] for _ in range(shards)]
        # per shard: its evictions stream read up to here (id, entry number)
        self.evictions_at: list[tuple[str, int]] = [("0-0", 0)] * shards

    def add(self, table: WeightTable, entries: list[StreamEntry]) -> None:
        if not entries:
            return
        table.add(
            np.array([e.ordinal for e in entries], dtype=np.int64),
            np.array([e.group for e in entries], dtype=np.uint64),
            [e.source for e in entries],
            np.array([arrival_ms(e.entry_id) for e in entries], dtype=np.int64),
        )
        # acknowledged once the table holding them is saved (at the next checkpoint): at-least-once
        for e in entries:
            self.unacked[e.shard].append(e.entry_id)

    def take_pending(self, table: WeightTable) -> None:
        """Entries this consumer got but did not acknowledge before it stopped: back into the table."""
        for shard in range(len(self.unacked)):
            after = "0"
            while True:
                entries = self.feed.read_pending(self.settings.read_count, after=after, shard=shard)
                if not entries:
                    break
                self.add(table, entries)
                after = entries[-1].entry_id
        self.add(table, self.feed.claim_stale(self.settings.claim_idle_ms))

    def poll(self, table: WeightTable, before_adding: Callable[[], None], *, wait: bool = False) -> int:
        """Read new entries (waiting up to 1 s for one when the table is empty or ``wait``: an idle
        trainer); ``before_adding`` runs between reading them and adding them (the trainer checks for a
        new validation set there, so samples posted after one join the new cohort). Returns how many
        entries were read. Raises Redis errors; entries read are added regardless."""
        block = 1000 if wait or not table.live else None
        entries = self.feed.read_new(self.settings.read_count, block_ms=block)
        try:
            if entries:
                before_adding()
        finally:  # delivered entries join the table even if Redis fails in between: none is dropped
            self.add(table, entries)
        return len(entries)

    def sync_evictions(self, table: WeightTable) -> None:
        """Mark the rows whose samples the buffer no longer holds, asking Redis about every live row (at
        start, or when the evictions stream was trimmed before it was read); O(rows) round trips / 10k."""
        # first: what is evicted from now on is read from the streams
        heads = [self.feed.eviction_head(s) for s in range(len(self.evictions_at))]
        rows = np.flatnonzero(table.alive)
        if len(rows):
            live = np.asarray(self.feed.live_ordinals(table.ordinal[rows].tolist()), dtype=np.bool_)
            table.kill(rows[np.logical_not(live)])
        self.evictions_at = heads

    def read_evictions(self, table: WeightTable) -> None:
        """Mark the rows of samples the buffer evicted since the last read, from the evictions streams the
        ingest script writes (one per shard; O(evicted)); a full ``sync_evictions`` if the reader fell
        behind a stream's cap."""
        for shard in range(len(self.evictions_at)):
            while True:
                at, ordinals, complete = self.feed.evictions(self.evictions_at[shard], shard=shard)
                if not complete:
                    self.sync_evictions(table)
                    return
                if at == self.evictions_at[shard]:  # nothing new
                    break
                self.evictions_at[shard] = at
                table.kill(table.rows_of(np.asarray(ordinals, dtype=np.int64)))

    def ack(self) -> None:
        """Acknowledge what a saved checkpoint now holds, and trim the stream (Redis errors propagate)."""
        for shard, ids in enumerate(self.unacked):
            self.feed.ack(ids, shard)
            ids.clear()
        self.feed.trim_acknowledged()


def arrival_ms(entry_id: str) -> int:
    """When Redis added a stream entry (unix ms): the first part of its id ``<ms>-<seq>``; 0 for an id
    that is not of that form (never the case for an id Redis generated)."""
    ms = entry_id.partition("-")[0]
    return int(ms) if ms.isdigit() else 0
