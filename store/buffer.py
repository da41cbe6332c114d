"""The sample buffer in Redis, as the API uses it (asyncio): ingest, look-ups, validation set, stats.

Layout and key names: ``store.keys``. Ingestion is one Lua script per request (``store.scripts.INGEST``):
dedup by id, insert, stream entry for the trainer and eviction down to capacity happen atomically, so a
request is all-or-nothing and concurrent clients count exactly. A sharded buffer (``DATADIET_BUFFER_SHARDS``
> 1) runs that script once per shard a request touches, and undoes the shards that succeeded when another
fails (``SampleBuffer.ingest``). The trainer's side (consumer group,
payload fetches, publishing weights) is ``store.feed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from store import scripts
from store.keys import UNWEIGHTED_PRIORITY, Keys, ShardsMismatch, shard_of_ordinal
from store.redis_client import AsyncClient

log = logging.getLogger(__name__)

WEIGHTS_MAX_AGE_S = 5.0
"""The longest a process serves its cached weights document without reading Redis again."""


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """A validated sample ready to store: its id, source, content group and compact JSON payload."""

    id: str
    source: str
    group: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int
    duplicates: int
    evicted: int
    flags: list[bool]  # per sample, request order: True = stored now, False = already present


class ValidationSetFull(Exception):
    def __init__(self, current: int, limit: int) -> None:
        super().__init__(f"the validation set holds {current} samples; the limit is {limit}")
        self.current, self.limit = current, limit


def stream_maxlen(capacity: int) -> int:
    """Cap on the ingest stream: entries beyond this refer to samples that must have been evicted."""
    return 2 * capacity + 10_000


def weight_from_priority(score: float | None) -> float | None:
    """A rank score as the sample's weight: samples not yet weighted by the trainer count as uniform."""
    if score is None:
        return None
    return 1.0 if score >= UNWEIGHTED_PRIORITY else float(score)


class SampleBuffer:
    """The API's view of one deployment's buffer (``keys``: its prefix and shard count).

    With one shard every operation is one script or pipeline on the ``{p}`` slot. With S > 1 shards
    (``store.keys``) a request's samples are grouped by shard, one INGEST call per shard, concurrently;
    reads of several samples are grouped the same way and their answers merged; counters are summed."""

    def __init__(self, client: AsyncClient, keys: Keys, capacity: int, validation_max: int) -> None:
        self.r: Any = client  # redis-py's stubs type replies too loosely to be useful here
        self.k = keys
        self.capacity = capacity
        # each shard evicts down to its share: the global lowest-first order holds in expectation only
        self.shard_capacity = -(-capacity // keys.shards)
        self.shard_keys = keys.all_shards()
        self.validation_max = validation_max
        self._ingest = client.register_script(scripts.INGEST)
        self._validation = client.register_script(scripts.VALIDATION)
        self._weights_of = client.register_script(scripts.WEIGHTS_OF)
        self._layout = client.register_script(scripts.LAYOUT)
        self.layout_checked = False  # this process's shard count agrees with the buffer's (check_layout)
        self._layout_asked = -math.inf  # monotonic time of the last check that found nothing recorded
        self._doc: tuple[bytes, float] | None = None  # (the weights document, monotonic time it was read)
        self._generation = 0  # bumped each time the cached document is dropped
        self._following = False  # subscribed to the trainer's announcements (follow_publications)

    async def check_layout(self, *, record: bool = False) -> None:
        """Check that the buffer is written with this process's shard count (``scripts.LAYOUT``); with
        ``record`` (an ingest), record it when nothing is stored yet. Once a count is known and agrees,
        ``layout_checked`` is set and this is not asked again (the API's buffer dependency and ingest call
        it until then). Raises ShardsMismatch: an API whose DATADIET_BUFFER_SHARDS differs from the
        trainer's would store samples it never reads, and read an empty buffer."""
        mode = "record" if record else "check"
        keys = [self.k.layout, self.k.unsharded_seq]
        actual = int(await self._layout(keys=keys, args=[self.k.shards, mode]))
        if actual == 0:  # a read before anything was stored: nothing to disagree with yet
            self._layout_asked = time.monotonic()
            return
        if actual != self.k.shards:
            raise ShardsMismatch(self.k.shards, actual)
        self.layout_checked = True

    async def ensure_layout(self) -> None:
        """``check_layout`` for a read: until a count is recorded, asked at most every WEIGHTS_MAX_AGE_S
        seconds (a fresh deployment's pollers cost no extra round trip each). Raises ShardsMismatch."""
        if self.layout_checked or time.monotonic() - self._layout_asked < WEIGHTS_MAX_AGE_S:
            return
        await self.check_layout()

    async def _ingest_shard(self, sk: Keys, records: list[SampleRecord]) -> list[int]:
        """One INGEST call on shard ``sk``: [accepted, duplicates, evicted, first ordinal, flags...]."""
        cap = self.shard_capacity
        args: list[Any] = [cap, UNWEIGHTED_PRIORITY, stream_maxlen(cap), sk.ordinal_base]
        for rec in records:
            args += (rec.id, rec.source, rec.group, rec.payload)
        keys = [sk.ids, sk.samples, sk.seq, sk.ingest, sk.priority, sk.counters, sk.evictions]
        out: list[int] = await self._ingest(keys=keys, args=args)  # integer replies: ints already
        return out

    async def ingest(self, records: list[SampleRecord]) -> IngestResult:
        """Store a request's samples, all or nothing (dedup by id, eviction down to capacity).

        Sharded: one INGEST call per shard the request touches, concurrently. If one fails (its error is
        raised, as a single call's would be) the calls that succeeded are undone (``scripts.INGEST_UNDO``:
        their samples removed and listed as evicted, the counters put back). What stays is the window
        docs/scaling.md describes: an undo that itself fails, or a call whose outcome is unknown (a
        timeout after Redis ran it)."""
        if not self.layout_checked:
            await self.check_layout(record=True)
        if not self.k.sharded:
            out = await self._ingest_shard(self.k, records)
            return IngestResult(out[0], out[1], out[2], [bool(f) for f in out[4:]])
        by_shard: dict[int, list[int]] = {}
        for i, rec in enumerate(records):
            by_shard.setdefault(self.k.shard_of(rec.id), []).append(i)
        shards = list(by_shard)
        tasks = [
            asyncio.ensure_future(self._ingest_shard(self.shard_keys[s], [records[i] for i in by_shard[s]]))
            for s in shards
        ]
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            # the request was cancelled (its client went away): the calls in flight still finish, and
            # those that stored anything are undone, so the request leaves nothing
            await asyncio.shield(self._undo_settled(shards, tasks))
            raise
        failed = [t.exception() for t in tasks if t.exception() is not None]
        if failed:
            await self._undo_settled(shards, tasks)
            raise failed[0]  # type: ignore[misc]  # an exception, not None
        accepted = duplicates = evicted = 0
        flags = [False] * len(records)
        for s, task in zip(shards, tasks, strict=True):
            reply = task.result()
            accepted, duplicates, evicted = accepted + reply[0], duplicates + reply[1], evicted + reply[2]
            for i, f in zip(by_shard[s], reply[4:], strict=True):
                flags[i] = bool(f)
        return IngestResult(accepted, duplicates, evicted, flags)

    async def _undo_settled(self, shards: list[int], tasks: Sequence[asyncio.Future[list[int]]]) -> None:
        """Wait for every shard's INGEST call, then undo those that succeeded."""
        await asyncio.wait(tasks)
        done = [(s, t.result()) for s, t in zip(shards, tasks, strict=True) if not t.exception()]
        await self._undo_calls(done)

    async def _undo_calls(self, done: list[tuple[int, list[int]]]) -> None:
        """Undo the INGEST calls that succeeded on these shards (shard, its reply); a failing undo is
        logged (the samples it could not remove stay stored: a retry of the request finds them as
        duplicates)."""

        async def undo(s: int, out: list[int]) -> int:
            sk = self.shard_keys[s]
            keys = [sk.ids, sk.samples, sk.priority, sk.counters, sk.evictions]
            args = [stream_maxlen(self.shard_capacity), out[3], out[0], out[1]]
            # EVAL, not EVALSHA: an undo is rare, and on a cluster a script not yet cached would be loaded
            # with SCRIPT LOAD on every master, the one whose failure is being undone included
            return int(await self.r.eval(scripts.INGEST_UNDO, len(keys), *keys, *args))

        todo = [(s, out) for s, out in done if out[0] or out[1]]
        results = await asyncio.gather(*(undo(s, out) for s, out in todo), return_exceptions=True)
        for (s, out), r in zip(todo, results, strict=True):
            if isinstance(r, BaseException):
                log.error(
                    "ingest failed on another shard, and undoing shard %d's part failed too (%s): its %d "
                    "samples from ordinal %d stay stored",
                    s,
                    r,
                    out[0],
                    out[3],
                )

    async def get(self, sample_id: str) -> dict[str, Any] | None:
        """One stored sample with its current weight, or None."""
        sk = self.shard_keys[self.k.shard_of(sample_id)]
        ordinal = await self.r.hget(sk.ids, sample_id)
        if ordinal is None:
            return None
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(sk.samples, ordinal)
        pipe.zscore(sk.priority, ordinal)
        payload, score = await pipe.execute()
        if payload is None:  # evicted between the two reads
            return None
        doc: dict[str, Any] = orjson.loads(payload)
        doc["weight"] = weight_from_priority(score)
        return doc

    async def weights_of(self, ids: str) -> tuple[int, bytes]:
        """The current weights of comma-separated sample ids, in one round trip (``scripts.WEIGHTS_OF``):
        (the step they were published at, 0 before the first publication; the members of a JSON object,
        ``"id":weight,...``, for the stored ids; unknown ids are absent, a repeated id appears once).

        The caller checks the ids first: 1-128 characters of ``[A-Za-z0-9._:-]`` each (none needs escaping
        in JSON); empty items between commas are skipped.

        Sharded: the ids are grouped by shard, one WEIGHTS_OF call per shard (concurrently) and the members
        joined; the step is read first, from the trainer's status, so the weights returned were published
        at that step or later (one shard's call cannot read the status: another slot)."""
        if not self.k.sharded:
            keys = [self.k.ids, self.k.priority, self.k.trainer]
            step, members = await self._weights_of(keys=keys, args=[ids, UNWEIGHTED_PRIORITY])
            return int(step or 0), bytes(members)
        by_shard: dict[int, list[str]] = {}
        for i in ids.split(","):
            if i:
                by_shard.setdefault(self.k.shard_of(i), []).append(i)
        step = await self.weights_step()
        replies = await asyncio.gather(
            *(
                self._weights_of(
                    keys=[self.shard_keys[s].ids, self.shard_keys[s].priority],
                    args=[",".join(group), UNWEIGHTED_PRIORITY],
                )
                for s, group in by_shard.items()
            )
        )
        return step, b",".join(bytes(members) for _, members in replies if members)

    async def weights_step(self) -> int:
        """The step of the trainer's last published weights (0 before the first)."""
        return int(await self.r.hget(self.k.trainer, "weights_step") or 0)

    async def _ranked_pairs(
        self, sk: Keys, order: str, limit: int, *, fill: bool
    ) -> list[tuple[bytes, float]]:
        """(ordinal, priority score) of shard ``sk``'s ``limit`` lowest / highest weighted samples, then
        never-weighted ones (oldest first) up to ``limit`` in all; ``fill``: always fetch those too."""
        if order == "asc":
            pairs = await self.r.zrangebyscore(
                sk.priority, "-inf", f"({UNWEIGHTED_PRIORITY}", 0, limit, withscores=True
            )
        else:
            pairs = await self.r.zrevrangebyscore(
                sk.priority, f"({UNWEIGHTED_PRIORITY}", "-inf", 0, limit, withscores=True
            )
        if fill or len(pairs) < limit:  # not enough weighted samples yet: never-weighted ones (weight 1)
            more = await self.r.zrangebyscore(
                sk.priority,
                UNWEIGHTED_PRIORITY,
                "+inf",
                0,
                limit - (0 if fill else len(pairs)),
                withscores=True,
            )
            pairs = [*pairs, *more]
        return list(pairs)

    async def ranked(self, order: str, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` lowest (asc) or highest (desc) weighted samples: id, source, weight. Sharded: each
        shard's ``limit`` merged (weighted ones by weight, then never-weighted ones by ordinal)."""
        if not self.k.sharded:
            pairs = await self._ranked_pairs(self.k, order, limit, fill=False)
        else:
            per_shard = await asyncio.gather(
                *(self._ranked_pairs(sk, order, limit, fill=True) for sk in self.shard_keys)
            )
            every = [p for shard in per_shard for p in shard]
            weighted = sorted((p for p in every if p[1] < UNWEIGHTED_PRIORITY), key=lambda p: p[1])
            if order != "asc":
                weighted.reverse()
            fresh = sorted((p for p in every if p[1] >= UNWEIGHTED_PRIORITY), key=lambda p: p[1])
            pairs = [*weighted, *fresh][:limit]
        if not pairs:
            return []
        payloads = await self._payloads([o for o, _ in pairs])
        out = []
        for (_, score), payload in zip(pairs, payloads, strict=True):
            if payload is None:
                continue
            doc = orjson.loads(payload)
            out.append({"id": doc["id"], "source": doc.get("source"), "weight": weight_from_priority(score)})
        return out

    async def _payloads(self, ordinals: list[bytes]) -> list[bytes | None]:
        """Stored payloads by ordinal, in order (None where gone), one HMGET per shard."""
        if not self.k.sharded:
            return list(await self.r.hmget(self.k.samples, ordinals))
        by_shard: dict[int, list[int]] = {}
        for i, o in enumerate(ordinals):
            by_shard.setdefault(shard_of_ordinal(int(o)), []).append(i)
        out: list[bytes | None] = [None] * len(ordinals)
        replies = await asyncio.gather(
            *(
                self.r.hmget(self.shard_keys[s].samples, [ordinals[i] for i in idx])
                for s, idx in by_shard.items()
            )
        )
        for idx, got in zip(by_shard.values(), replies, strict=True):
            for i, p in zip(idx, got, strict=True):
                out[i] = p
        return out

    async def ready(self) -> None:
        """A keyed read on every shard (not PING: on a Redis Cluster it asks the master of each buffer
        slot). Raises Redis errors."""
        await asyncio.gather(*(self.r.exists(sk.seq) for sk in self.shard_keys))

    async def set_validation(self, payloads: list[bytes], *, append: bool) -> tuple[int, int]:
        """Replace (or append to) the validation set; returns (count, version)."""
        mode = "append" if append else "replace"
        out = await self._validation(
            keys=[self.k.val_samples, self.k.val_version], args=[mode, self.validation_max, *payloads]
        )
        if int(out[0]) < 0:
            raise ValidationSetFull(int(out[1]) + len(payloads), self.validation_max)
        return int(out[0]), int(out[1])

    async def validation_info(self) -> tuple[int, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(self.k.val_samples)
        pipe.get(self.k.val_version)
        count, version = await pipe.execute()
        return int(count), int(version or 0)

    async def stats(self) -> dict[str, Any]:
        pipe = self.r.pipeline(transaction=False)
        for sk in self.shard_keys:
            pipe.hlen(sk.samples)
            pipe.hgetall(sk.counters)
        pipe.hgetall(self.k.trainer)
        *per_shard, trainer = await pipe.execute()
        size = sum(int(n) for n in per_shard[0::2])
        c: dict[str, int] = {}
        for counters in per_shard[1::2]:  # summed over the shards
            for k, v in counters.items():
                c[k.decode()] = c.get(k.decode(), 0) + int(v)
        t = {k.decode(): v.decode() for k, v in trainer.items()}
        count, version = await self.validation_info()
        return {
            "buffer": {
                "size": int(size),
                "capacity": self.capacity,
                "ingested": c.get("ingested", 0),
                "duplicates": c.get("duplicates", 0),
                "evicted": c.get("evicted", 0),
                "quarantined": c.get("quarantined", 0),
            },
            "validation": {"count": count, "version": version},
            "trainer": {
                "step": int(t["step"]) if "step" in t else None,
                "steps_per_s": float(t["steps_per_s"]) if "steps_per_s" in t else None,
                "val_loss": float(t["val_loss"]) if t.get("val_loss") not in (None, "", "nan") else None,
                "updated_at": t.get("updated_at"),
                "unscored": int(t["unscored"]) if t.get("unscored", "").isdigit() else None,
                "state": t.get("state"),  # trainer/publish.py status(): training, idle, ...
            },
        }

    async def quarantined(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest quarantined samples, newest first: id, source, reason, the trainer step and
        time (ISO 8601, UTC) it was quarantined at, and the sample as it was posted. Sharded: each shard's
        quarantine stream's ``limit`` newest, merged by entry id (time)."""
        from datetime import UTC, datetime

        per_shard = await asyncio.gather(
            *(self.r.xrevrange(sk.quarantine, count=limit) for sk in self.shard_keys)
        )
        entries = [e for shard in per_shard for e in shard]
        if len(per_shard) > 1:
            entries.sort(key=lambda e: tuple(int(x) for x in e[0].decode().split("-")), reverse=True)
        out = []
        for entry_id, fields in entries[:limit]:
            f = {k.decode(): v for k, v in fields.items()}
            ms = int(entry_id.decode().split("-", 1)[0])
            out.append(
                {
                    "id": f["id"].decode(),
                    "source": f["source"].decode(),
                    "reason": f["reason"].decode(),
                    "step": int(f["step"]),
                    "quarantined_at": datetime.fromtimestamp(ms / 1000, UTC).isoformat(),
                    "sample": orjson.loads(f["payload"]),
                }
            )
        return out

    async def mark_download(self, version: int, until: float) -> None:
        """Checkpoint ``version`` is in use (a download streams it, or may resume it by Range) until the
        unix time ``until``: retention keeps its file until then (trainer/publish.py)."""
        await self.r.zadd(self.k.downloads, {str(version): until})

    # --- the weights document, cached in this process ------------------------------------------------
    # Every GET /v1/weights would otherwise cost a Redis round trip (in redis-py's asyncio client, more CPU
    # than the rest of the request). The trainer announces each new document on a Pub/Sub channel
    # (scripts.FENCED_STATUS); while ``follow_publications`` is subscribed, the cached copy is served until
    # that message drops it (milliseconds after a publication), and for at most WEIGHTS_MAX_AGE_S in any
    # case (an operator's FLUSHALL publishes nothing). Unsubscribed (Redis down, reconnecting), every
    # request reads Redis, as before: nothing is served that Redis could not confirm.

    async def weights_raw(self) -> bytes | None:
        """The weights document as the trainer published it (JSON bytes), or None before the first."""
        cached = self._doc
        if cached is not None and self._following and time.monotonic() - cached[1] < WEIGHTS_MAX_AGE_S:
            return cached[0]
        generation = self._generation
        raw = await self.r.get(self.k.weights)
        doc = bytes(raw) if raw else None
        # a publication announced while this read was in flight may be newer than what it got: keep nothing
        if doc is not None and self._following and generation == self._generation:
            self._doc = (doc, time.monotonic())
        return doc

    def _drop_cached(self) -> None:
        self._generation += 1
        self._doc = None

    async def follow_publications(
        self, client: aioredis.Redis, stop: asyncio.Event, retry_s: float = 1.0, poll_s: float = 1.0
    ) -> None:
        """Keep this process's cached weights document current: subscribe to the trainer's announcements
        and drop the copy on each (Redis Pub/Sub, at-most-once: a message lost while disconnected is made
        up for by dropping the copy on every (re)subscription). ``client`` is a connection of its own
        (no socket timeout: it waits for messages). Returns within about ``poll_s`` seconds of ``stop``
        being set, even if a read inside redis-py's Pub/Sub swallowed a cancellation (cancel it too, for
        a prompt stop: app/main.py's lifespan does).
        Reconnects every ``retry_s`` seconds while Redis is unavailable; pings after WEIGHTS_MAX_AGE_S
        seconds without a message, so a dead connection is noticed."""
        while not stop.is_set():
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.k.weights_published)
                heard = time.monotonic()
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=poll_s)
                    if message is None:
                        if time.monotonic() - heard > WEIGHTS_MAX_AGE_S:  # quiet: does it still answer?
                            await pubsub.ping()
                            heard = time.monotonic()
                        continue
                    heard = time.monotonic()
                    if message["type"] == "subscribe":
                        self._following = True
                    self._drop_cached()
            except (RedisError, OSError) as e:
                log.debug("weights announcements: %s; reading Redis on every request until resubscribed", e)
            finally:
                self._following = False
                self._drop_cached()
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(1.0):  # never hold up a shutdown on a dead connection
                        await pubsub.aclose()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_s)
