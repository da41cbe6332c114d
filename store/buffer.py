"""The sample buffer in Redis, as the API uses it (asyncio): ingest, look-ups, validation set, stats.

Layout and key names: ``store.keys``. Ingestion is one Lua script per request (``store.scripts.INGEST``):
dedup by id, insert, stream entry for the trainer and eviction down to capacity happen atomically, so a
request is all-or-nothing and concurrent clients count exactly. The trainer's side (consumer group,
payload fetches, publishing weights) is ``store.feed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from store import scripts
from store.keys import UNWEIGHTED_PRIORITY, Keys


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
    def __init__(self, client: aioredis.Redis, keys: Keys, capacity: int, validation_max: int) -> None:
        self.r: Any = client  # redis-py's stubs type replies too loosely to be useful here
        self.k = keys
        self.capacity = capacity
        self.validation_max = validation_max
        self._ingest = client.register_script(scripts.INGEST)
        self._validation = client.register_script(scripts.VALIDATION)

    async def ingest(self, records: list[SampleRecord]) -> IngestResult:
        args: list[Any] = [self.capacity, UNWEIGHTED_PRIORITY, stream_maxlen(self.capacity)]
        for rec in records:
            args += (rec.id, rec.source, rec.group, rec.payload)
        k = self.k
        keys = [k.ids, k.samples, k.seq, k.ingest, k.priority, k.counters, k.evictions]
        out = await self._ingest(keys=keys, args=args)
        return IngestResult(int(out[0]), int(out[1]), int(out[2]), [bool(f) for f in out[3:]])

    async def get(self, sample_id: str) -> dict[str, Any] | None:
        """One stored sample with its current weight, or None."""
        ordinal = await self.r.hget(self.k.ids, sample_id)
        if ordinal is None:
            return None
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.k.samples, ordinal)
        pipe.zscore(self.k.priority, ordinal)
        payload, score = await pipe.execute()
        if payload is None:  # evicted between the two reads
            return None
        doc: dict[str, Any] = orjson.loads(payload)
        doc["weight"] = weight_from_priority(score)
        return doc

    async def weights_of(self, ids: list[str]) -> dict[str, float]:
        """Current weights of the given ids; unknown ids are absent."""
        if not ids:
            return {}
        ordinals = await self.r.hmget(self.k.ids, ids)
        known = [(i, o) for i, o in zip(ids, ordinals, strict=True) if o is not None]
        if not known:
            return {}
        scores = await self.r.zmscore(self.k.priority, [o for _, o in known])
        return {
            i: w
            for (i, _), s in zip(known, scores, strict=True)
            if (w := weight_from_priority(s)) is not None
        }

    async def ranked(self, order: str, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` lowest (asc) or highest (desc) weighted samples: id, source, weight."""
        if order == "asc":
            pairs = await self.r.zrangebyscore(
                self.k.priority, "-inf", f"({UNWEIGHTED_PRIORITY}", 0, limit, withscores=True
            )
        else:
            pairs = await self.r.zrevrangebyscore(
                self.k.priority, f"({UNWEIGHTED_PRIORITY}", "-inf", 0, limit, withscores=True
            )
        if len(pairs) < limit:  # not enough weighted samples yet: fill with never-weighted ones (weight 1)
            more = await self.r.zrangebyscore(
                self.k.priority, UNWEIGHTED_PRIORITY, "+inf", 0, limit - len(pairs), withscores=True
            )
            pairs = [*pairs, *more]
        if not pairs:
            return []
        payloads = await self.r.hmget(self.k.samples, [o for o, _ in pairs])
        out = []
        for (_, score), payload in zip(pairs, payloads, strict=True):
            if payload is None:
                continue
            doc = orjson.loads(payload)
            out.append({"id": doc["id"], "source": doc.get("source"), "weight": weight_from_priority(score)})
        return out

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
        pipe.hlen(self.k.samples)
        pipe.hgetall(self.k.counters)
        pipe.hgetall(self.k.trainer)
        size, counters, trainer = await pipe.execute()
        c = {k.decode(): int(v) for k, v in counters.items()}
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
            },
        }

    async def quarantined(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest quarantined samples, newest first: id, source, reason, the trainer step and
        time (ISO 8601, UTC) it was quarantined at, and the sample as it was posted."""
        from datetime import UTC, datetime

        entries = await self.r.xrevrange(self.k.quarantine, count=limit)
        out = []
        for entry_id, fields in entries:
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

    async def weights_doc(self) -> dict[str, Any] | None:
        raw = await self.r.get(self.k.weights)
        return json.loads(raw) if raw else None
