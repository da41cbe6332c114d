"""The trainer's side of the buffer (synchronous redis-py): the ingest stream through a consumer group,
payload fetches, the validation set, and publishing weights, status, checkpoint versions and the
quarantine for the API. Every write is fenced by the trainer lease (``store.lease``): a trainer that lost
its lease raises ``LeaseLost`` instead of writing.

Delivery is at-least-once: an entry stays pending until ``ack``; entries pending on a consumer that died
are taken over with ``claim_stale`` (XAUTOCLAIM), and a restarted consumer of the same name re-reads its
own pending entries with ``read_pending``.

A sharded buffer (``Keys.shards`` > 1) has an ingest stream, an evictions stream and a consumer group per
shard. Stream entry ids are per stream, so every call that takes or returns entry ids names its shard
(``StreamEntry.shard``); calls about ordinals group them by shard (an ordinal carries its shard in its top
bits, ``store.keys.SHARD_BITS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import redis

from store import scripts
from store.keys import SHARD_BITS, TRAINER_GROUP, UNWEIGHTED_PRIORITY, Keys, ShardsMismatch
from store.lease import TrainerLease
from store.redis_client import SyncClient

QUARANTINE_MAXLEN = 10_000
"""The quarantine stream keeps about this many of the newest entries; its counter counts every one."""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    entry_id: str  # the stream entry id, for ack
    ordinal: int  # the sample's ordinal: key of its payload and its rank
    source: str
    group: int  # 64-bit content group (identical content shares it)
    shard: int = 0  # the shard whose stream holds the entry (0 unsharded)


def _entries(raw: Sequence[Any], shard: int = 0) -> list[StreamEntry]:
    out = []
    for entry_id, fields in raw:
        if not fields:  # deleted by MAXLEN trimming while pending
            continue
        out.append(
            StreamEntry(
                entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                int(fields[b"o"]),
                fields[b"s"].decode(),
                int(fields[b"g"], 16),
                shard,
            )
        )
    return out


class TrainerFeed:
    def __init__(
        self, client: SyncClient, keys: Keys, consumer: str = "trainer-0", lease_ttl_s: float = 30.0
    ) -> None:
        self.r: Any = client  # redis-py's stubs type replies too loosely to be useful here
        self.k = keys
        self.consumer = consumer
        self.lease = TrainerLease(client, keys, lease_ttl_s)
        self._ranks = self.r.register_script(scripts.FENCED_RANKS)
        self._status = self.r.register_script(scripts.FENCED_STATUS)
        self._reserve = self.r.register_script(scripts.FENCED_RESERVE_VERSION)
        self._quarantine = self.r.register_script(scripts.FENCED_QUARANTINE)
        self._shard_ranks = self.r.register_script(scripts.FENCED_SHARD_RANKS)
        self._shard_quarantine = self.r.register_script(scripts.FENCED_SHARD_QUARANTINE)
        self._layout = self.r.register_script(scripts.LAYOUT)
        self.shard_keys = keys.all_shards()
        self._next_block = 0  # sharded on a cluster: the shard whose stream the next blocking read waits on
        self._cluster = hasattr(client, "get_node_from_key")  # redis-py's (sync) cluster client

    @staticmethod
    def by_shard(ordinals: np.ndarray) -> dict[int, np.ndarray]:
        """Positions in ``ordinals`` (int64) grouped by their shard (``ordinal >> SHARD_BITS``)."""
        shard = ordinals >> SHARD_BITS
        return {int(s): np.flatnonzero(shard == s) for s in np.unique(shard)}

    def ensure_group(self) -> None:
        """Create the consumer group at the stream's start (every shard's), so samples accepted earlier
        are delivered. Raises ShardsMismatch (store.keys) when the buffer was written with another shard
        count than this trainer's: it would read streams nobody writes (scripts.LAYOUT)."""
        keys = [self.k.layout, self.k.unsharded_seq]
        actual = int(self._layout(keys=keys, args=[self.k.shards, "record"]))
        if actual != self.k.shards:
            raise ShardsMismatch(self.k.shards, actual)
        for sk in self.shard_keys:
            try:
                self.r.xgroup_create(sk.ingest, TRAINER_GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def read_new(self, count: int, block_ms: int | None = None) -> list[StreamEntry]:
        """Entries never delivered to any consumer of the group (the group is made again if Redis lost
        it: a restart without persistence).

        Sharded: at most ceil(count / shards) entries of each shard's stream. On one server that is one
        XREADGROUP over every stream (blocking up to ``block_ms``); on a cluster the keys of one command
        must share a slot, so each shard is read without blocking (a pipeline, one round trip per node)
        and, only when none had anything, one shard (in turn) is waited on for at most 100 ms."""
        try:
            if not self.k.sharded:
                res = self.r.xreadgroup(
                    TRAINER_GROUP, self.consumer, {self.k.ingest: ">"}, count=count, block=block_ms
                )
                return _entries(res[0][1]) if res else []
            per = -(-count // self.k.shards)
            if not self._cluster:
                streams = {sk.ingest: ">" for sk in self.shard_keys}
                res = self.r.xreadgroup(TRAINER_GROUP, self.consumer, streams, count=per, block=block_ms)
                return self._sharded_entries(res or [])
            pipe = self.r.pipeline(transaction=False)
            for sk in self.shard_keys:
                pipe.xreadgroup(TRAINER_GROUP, self.consumer, {sk.ingest: ">"}, count=per)
            out = [e for res in pipe.execute() for e in self._sharded_entries(res or [])]
            if out or block_ms is None:
                return out
            sk = self.shard_keys[self._next_block]
            self._next_block = (self._next_block + 1) % self.k.shards
            res = self.r.xreadgroup(
                TRAINER_GROUP, self.consumer, {sk.ingest: ">"}, count=per, block=min(block_ms, 100)
            )
            return self._sharded_entries(res or [])
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self.ensure_group()
            return []

    def _sharded_entries(self, res: Sequence[Any]) -> list[StreamEntry]:
        """A sharded XREADGROUP reply ([stream key, entries] per stream) as entries of their shards."""
        shard_of_stream = {sk.ingest: sk.shard or 0 for sk in self.shard_keys}
        out: list[StreamEntry] = []
        for stream, raw in res:
            name = stream.decode() if isinstance(stream, bytes) else stream
            out += _entries(raw, shard_of_stream[name])
        return out

    def read_pending(self, count: int, after: str = "0", shard: int = 0) -> list[StreamEntry]:
        """This consumer's own delivered-but-unacknowledged entries of ``shard``'s stream after stream id
        ``after`` (a restarted consumer of the same name pages through them, passing the last entry id it
        got)."""
        sk = self.shard_keys[shard]
        res = self.r.xreadgroup(TRAINER_GROUP, self.consumer, {sk.ingest: after}, count=count)
        return _entries(res[0][1], shard) if res else []

    def claim_stale(self, min_idle_ms: int, count: int = 1000) -> list[StreamEntry]:
        """Take over entries pending longer than ``min_idle_ms`` on any consumer (one that died), at most
        ``count`` of each shard's stream."""
        out: list[StreamEntry] = []
        for s, sk in enumerate(self.shard_keys):
            res = self.r.xautoclaim(sk.ingest, TRAINER_GROUP, self.consumer, min_idle_ms, "0-0", count=count)
            out += _entries(res[1], s)
        return out

    def ack(self, entry_ids: Sequence[str], shard: int = 0) -> None:
        """Acknowledge entries of ``shard``'s stream."""
        if entry_ids:
            self.r.xack(self.shard_keys[shard].ingest, TRAINER_GROUP, *entry_ids)

    def trim_acknowledged(self) -> None:
        """Drop stream entries every consumer has acknowledged (keeps the streams bounded)."""
        for sk in self.shard_keys:
            self._trim_acknowledged(sk)

    def _trim_acknowledged(self, sk: Keys) -> None:
        pending = self.r.xpending(sk.ingest, TRAINER_GROUP)
        if pending["pending"]:
            min_id = pending["min"]
        else:
            groups = self.r.xinfo_groups(sk.ingest)
            last = next(
                (
                    g["last-delivered-id"]
                    for g in groups
                    if g["name"] in (TRAINER_GROUP, TRAINER_GROUP.encode())
                ),
                None,
            )
            if last is None:
                return
            ms, seq = (last.decode() if isinstance(last, bytes) else last).split("-")
            min_id = f"{ms}-{int(seq) + 1}"
        self.r.xtrim(sk.ingest, minid=min_id, approximate=True)

    def fetch(self, ordinals: Sequence[int]) -> list[dict[str, Any] | None]:
        """Payloads by ordinal, in order; None where the sample has been evicted."""
        if not len(ordinals):
            return []
        if not self.k.sharded:
            raw = self.r.hmget(self.k.samples, [int(o) for o in ordinals])
            return [orjson.loads(p) if p is not None else None for p in raw]
        ords = np.asarray(ordinals, dtype=np.int64)
        groups = self.by_shard(ords)
        pipe = self.r.pipeline(transaction=False)
        for s, idx in groups.items():
            pipe.hmget(self.shard_keys[s].samples, ords[idx].tolist())
        out: list[dict[str, Any] | None] = [None] * len(ords)
        for idx, raw in zip(groups.values(), pipe.execute(), strict=True):
            for i, p in zip(idx.tolist(), raw, strict=True):
                out[i] = orjson.loads(p) if p is not None else None
        return out

    def validation_version(self) -> int:
        return int(self.r.get(self.k.val_version) or 0)

    def validation(self) -> tuple[int, list[dict[str, Any]]]:
        """The validation set and its version, read consistently."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.k.val_version)
        pipe.lrange(self.k.val_samples, 0, -1)
        version, payloads = pipe.execute()
        return int(version or 0), [orjson.loads(p) for p in payloads]

    def evictions(
        self, after: tuple[str, int], count: int = 10_000, shard: int = 0
    ) -> tuple[tuple[str, int], list[int], bool]:
        """Ordinals the buffer (shard ``shard``) evicted after ``after`` = (stream id, entry number) of the
        last entry of that shard's evictions stream read (("0-0", 0) for none), at most ``count`` entries:
        (the new position, ordinals, complete).
        ``complete`` is False when entries after ``after`` were trimmed from the capped stream before they
        were read (the reader fell behind): the caller must check every sample instead."""
        last_id, last_n = after
        res = self.r.xrange(self.shard_keys[shard].evictions, min=f"({last_id}", count=count)
        ordinals: list[int] = []
        complete = True
        for i, (entry_id, fields) in enumerate(res):
            n = int(fields[b"n"])
            if i == 0 and last_n and n != last_n + 1:
                complete = False
            last_id, last_n = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id), n
            ordinals.extend(int(o) for o in fields[b"o"].split(b","))
        return (last_id, last_n), ordinals, complete

    def checkpoints_in_use(self, now: float) -> set[int]:
        """Versions a download is streaming or may resume (``mark_download``); stale marks are dropped."""
        self.r.zremrangebyscore(self.k.downloads, "-inf", f"({now}")
        return {int(v) for v in self.r.zrangebyscore(self.k.downloads, now, "+inf")}

    def eviction_head(self, shard: int = 0) -> tuple[str, int]:
        """The position of shard ``shard``'s newest evictions entry (("0-0", 0) when there is none)."""
        res = self.r.xrevrange(self.shard_keys[shard].evictions, count=1)
        if not res:
            return "0-0", 0
        entry_id, fields = res[0]
        return (entry_id.decode() if isinstance(entry_id, bytes) else entry_id), int(fields[b"n"])

    def live_ordinals(self, ordinals: Sequence[int], chunk: int = 10_000) -> list[bool]:
        """Whether each ordinal is still in the buffer (its rank exists iff it was not evicted)."""
        if not self.k.sharded:
            out: list[bool] = []
            for i in range(0, len(ordinals), chunk):
                scores = self.r.zmscore(self.k.priority, [int(o) for o in ordinals[i : i + chunk]])
                out.extend(sc is not None for sc in scores)
            return out
        ords = np.asarray(ordinals, dtype=np.int64)
        live = np.zeros(len(ords), dtype=np.bool_)
        for s, idx in self.by_shard(ords).items():
            for i in range(0, len(idx), chunk):
                part = idx[i : i + chunk]
                scores = self.r.zmscore(self.shard_keys[s].priority, ords[part].tolist())
                live[part] = [sc is not None for sc in scores]
        return live.tolist()

    def publish_weights(
        self,
        doc: dict[str, Any],
        ordinals: Sequence[int] | np.ndarray,
        weights: Sequence[float] | np.ndarray,
        chunk: int = 20_000,
    ) -> None:
        """Publish per-sample weights into the rank zset (existing members only) and the summary document,
        under the lease.

        ZADD XX never re-adds a sample that the API evicted meanwhile. Weights are capped below
        UNWEIGHTED_PRIORITY. Sharded: each shard's weights into its own zset, fenced by the shard's token
        (``TrainerLease.fenced_shard``), then the document under the lease.
        """
        cap = UNWEIGHTED_PRIORITY / 2
        all_scores = np.minimum(np.asarray(weights, dtype=np.float64), cap)
        all_members = np.asarray(ordinals, dtype=np.int64)
        if self.k.sharded:  # each shard's members into its own zset
            parts = [
                (self.shard_keys[s], all_members[idx].tolist(), all_scores[idx].tolist())
                for s, idx in self.by_shard(all_members).items()
            ]
        else:
            parts = [(self.k, all_members.tolist(), all_scores.tolist())]
        for sk, members, scores in parts:
            for i in range(0, len(members), chunk):
                args: list[Any] = [None] * (2 * len(members[i : i + chunk]))
                args[0::2], args[1::2] = scores[i : i + chunk], members[i : i + chunk]  # score, member pairs
                if not args:
                    continue
                if self.k.sharded:  # another slot than the lease's: fenced by the shard's token
                    self.lease.fenced_shard(self._shard_ranks, sk, [sk.priority], args)
                else:
                    self.lease.fenced(self._ranks, [self.k.priority], args)
        status = ["weights_step", int(doc.get("step", 0))]  # GET /v1/weights/samples reads it
        self.lease.fenced(
            self._status,
            [self.k.weights, self.k.trainer, self.k.weights_published],
            [orjson.dumps(doc), *status],
        )

    def set_status(self, **fields: Any) -> None:
        args: list[Any] = [""]
        for k, v in fields.items():
            args += (k, str(v))
        self.lease.fenced(self._status, [self.k.weights, self.k.trainer, self.k.weights_published], args)

    def reserve_checkpoint_version(self, floor: int) -> int:
        """The next checkpoint version, above ``floor`` and every version reserved before, under the lease:
        reserved before its file is written, so no two trainers ever write one version."""
        return int(self.lease.fenced(self._reserve, [self.k.checkpoint_version], [int(floor)]))

    def quarantine(
        self, ordinals: Sequence[int], sources: Sequence[str], reasons: Sequence[str], step: int
    ) -> int:
        """Move samples the trainer cannot use out of the buffer into the quarantine stream (with their
        reasons), under the lease; returns how many were still stored (and are now counted)."""
        ords = [int(o) for o in ordinals]
        if self.k.sharded:
            groups = {s: idx.tolist() for s, idx in self.by_shard(np.asarray(ords, dtype=np.int64)).items()}
        else:
            groups = {0: list(range(len(ords)))}
        n = 0
        for s, idx in groups.items():
            args: list[Any] = [QUARANTINE_MAXLEN, int(step)]
            for j in idx:
                args += (ords[j], sources[j], reasons[j][:1000])
            if len(args) == 2:
                continue
            sk = self.shard_keys[s]
            keys = [sk.samples, sk.priority, sk.ids, sk.quarantine, sk.counters]
            if self.k.sharded:  # the shard's own quarantine stream, fenced by the shard's token
                n += int(self.lease.fenced_shard(self._shard_quarantine, sk, keys, args))
            else:
                n += int(self.lease.fenced(self._quarantine, keys, args))
        return n
