"""Every Redis key datadiet uses, built in one place.

A reader can list the whole Redis layout from this file:

    {p}:ids            hash    sample id -> ordinal (int); the dedup index
    {p}:samples        hash    ordinal -> compact payload (orjson of the validated sample, id included)
    {p}:seq            string  last ordinal handed out (INCR)
    {p}:ingest         stream  one entry per accepted sample: o=<ordinal> s=<source> g=<content group>
    {p}:evictions      stream  one entry per ingest request that evicted: n=<entry number> o=<ordinal>,...
                               (capped; counters.eviction_entries numbers them)
    {p}:rank           zset    eviction priority (``Keys.priority``), ordinal -> the published weight, or
                               UNWEIGHTED_PRIORITY + ordinal for samples the trainer has not weighted yet;
                               the lowest is evicted first
    {p}:counters       hash    ingested, duplicates, evicted, quarantined, eviction_entries
    {p}:val:samples    list    validation payloads (orjson)
    {p}:val:version    string  validation-set version (INCR on every PUT/POST)
    {p}:weights        string  JSON document the trainer publishes for GET /v1/weights
    {p}:weights:published  channel  a message on every new weights document (API workers cache the
                               document and drop it on this message; store.buffer)
    {p}:trainer        hash    trainer status: step, steps_per_s, val_loss, updated_at, pid
    {p}:quarantine     stream  samples the trainer could not use (capped): id, source, ordinal, reason,
                               step, payload; their payloads left the samples hash and the priority zset
    {p}:trainer:lease  string  "<fencing token> <host> <pid>" of the trainer that may write, with a TTL
    {p}:trainer:fence  string  the last fencing token handed out (INCR; only grows)
    {p}:downloads      zset    checkpoint version -> unix time until which it is in use (streaming, or
                               resumable by Range): retention never deletes it before then
    {p}:checkpoint:version string  the last checkpoint version reserved (a version is reserved, under the
                               lease, before its file is written)
    {p}:buffer:shards  string  the shard count the buffer is written with (scripts.LAYOUT; processes whose
                               DATADIET_BUFFER_SHARDS differs refuse: ShardsMismatch)

With ``DATADIET_BUFFER_SHARDS`` = S > 1 the buffer is split over S hash tags ``{p:0}`` ... ``{p:S-1}``;
a sample lives on shard ``shard_of(id)`` (crc32 of the id mod S), and these keys exist once per shard s
instead of once under ``{p}``:

    {p:s}:ids, {p:s}:samples, {p:s}:seq, {p:s}:ingest, {p:s}:evictions, {p:s}:rank, {p:s}:counters,
    {p:s}:quarantine   as above, for the samples of shard s; counters are summed when read
    {p:s}:fence_seen   string  the highest fencing token that has written to shard s (the trainer's
                               per-shard writes cannot check the global lease in one script: CROSSSLOT)

An ordinal of shard s is ``s << SHARD_BITS | <s's seq>`` (shard 0's are plain seq values), so ordinals
stay unique int64s without a global counter. Everything else (validation set, weights document and
channel, trainer status, lease, fence, downloads, checkpoint version) stays under ``{p}``. With S = 1
(the default) there is no ``{p:s}`` key at all: the layout above, byte for byte.

The prefix ``p`` defaults to ``dd``. With one shard all keys of a deployment share the hash tag ``{p}`` so
a Redis Cluster (``DATADIET_REDIS_URL=redis+cluster://host:port``, store/redis_client.py) keeps them in
one slot: Redis refuses a script or MULTI whose keys are in different slots (CROSSSLOT), and the buffer's
invariants are such scripts (store/scripts.py): INGEST does dedup (ids), insert (samples, seq), the
trainer's stream entry (ingest) and eviction down to capacity (rank, counters, evictions) atomically; the
trainer's writes check the lease in the same script; ``weights:published`` is passed as a key to the
script that publishes on it, so it too must share the tag. The price: one deployment's buffer is one
master's memory and one master's thread, whatever the cluster's size; sharding (above) spreads it over S
slots, each shard's invariants kept by the same scripts on its own keys, the trainer's shard writes fenced
by ``fence_seen`` (docs/scaling.md, "Redis Cluster", with measurements).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

TRAINER_GROUP = "trainer"
"""Consumer group through which trainers read the ingest stream."""

UNWEIGHTED_PRIORITY = 1e12
"""Eviction-priority offset for samples without a published weight: they sort after every weighted one
(so the trainer's lowest weights are evicted first, then the oldest unweighted samples)."""


SHARD_BITS = 48
"""An ordinal's low SHARD_BITS bits are its shard's sequence number, the bits above them its shard."""

MAX_SHARDS = 16
"""Most shards a buffer may have: ``MAX_SHARDS << SHARD_BITS`` plus UNWEIGHTED_PRIORITY stays below 2**53,
so every ordinal and every priority score is exact in a Lua number and a Redis zset score (doubles)."""


def shard_of(sample_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) holding sample ``sample_id``: CRC-32 (zlib, ISO-HDLC) of its UTF-8 bytes
    mod ``shards``; stable across processes, machines and releases, unlike Python's ``hash()``."""
    return zlib.crc32(sample_id.encode()) % shards if shards > 1 else 0


def shard_of_ordinal(ordinal: int) -> int:
    """The shard an ordinal was handed out by (its bits above SHARD_BITS)."""
    return int(ordinal) >> SHARD_BITS


class ShardsMismatch(RuntimeError):
    """This process's DATADIET_BUFFER_SHARDS is not the one the deployment's buffer was written with: its
    samples would go to (or be read from) keys no other process uses, and be lost to training silently."""

    def __init__(self, configured: int, actual: int) -> None:
        super().__init__(
            f"DATADIET_BUFFER_SHARDS={configured}, but this deployment's buffer is split over {actual} "
            f"shard(s): every API and the trainer must say {actual} (changing it is a migration: "
            "docs/scaling.md, 'Changing S')"
        )
        self.configured, self.actual = configured, actual


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one deployment (``prefix``) whose buffer has ``shards`` shards. ``shard`` is None for
    the deployment's global keys; ``for_shard(s)`` gives the keys of shard s. With one shard both are the
    same ``{prefix}`` keys."""

    prefix: str = "dd"
    shards: int = 1
    shard: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"a buffer has 1 to {MAX_SHARDS} shards, not {self.shards}")
        if self.shard is not None and not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} of {self.shards}")

    def _k(self, name: str) -> str:
        return f"{{{self.prefix}}}:{name}"

    def _s(self, name: str) -> str:
        """A per-shard key: under ``{prefix:shard}`` when sharded, else ``{prefix}``."""
        if self.shards == 1:
            return self._k(name)
        if self.shard is None:
            raise ValueError(f"{name!r} is a per-shard key: use Keys.for_shard(s)")
        return f"{{{self.prefix}:{self.shard}}}:{name}"

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    @property
    def layout(self) -> str:
        """The shard count the buffer was first written with (``scripts.LAYOUT``); global."""
        return self._k("buffer:shards")

    @property
    def unsharded_seq(self) -> str:
        """The one-shard buffer's seq: it exists once an unsharded buffer has stored a sample."""
        return self._k("seq")

    def for_shard(self, shard: int) -> Keys:
        """The keys of shard ``shard`` (itself when there is one shard)."""
        if self.shards == 1:
            return self
        return Keys(self.prefix, self.shards, shard)

    def all_shards(self) -> list[Keys]:
        """Every shard's keys, shard 0 first."""
        return [self.for_shard(s) for s in range(self.shards)]

    def shard_of(self, sample_id: str) -> int:
        return shard_of(sample_id, self.shards)

    @property
    def ordinal_base(self) -> int:
        """The first ordinal of this shard's range: ``shard << SHARD_BITS`` (0 unsharded)."""
        return (self.shard or 0) << SHARD_BITS

    @property
    def fence_seen(self) -> str:
        """Shard only: the highest fencing token that wrote to this shard (scripts.FENCED_SHARD_*)."""
        if self.shards == 1 or self.shard is None:
            raise ValueError("fence_seen is a key of a shard of a sharded buffer")
        return self._s("fence_seen")

    @property
    def ids(self) -> str:
        return self._s("ids")

    @property
    def samples(self) -> str:
        return self._s("samples")

    @property
    def seq(self) -> str:
        return self._s("seq")

    @property
    def ingest(self) -> str:
        return self._s("ingest")

    @property
    def evictions(self) -> str:
        return self._s("evictions")

    @property
    def priority(self) -> str:
        """The eviction priority zset (key name ``rank``, kept for existing deployments)."""
        return self._s("rank")

    @property
    def counters(self) -> str:
        return self._s("counters")

    @property
    def val_samples(self) -> str:
        return self._k("val:samples")

    @property
    def val_version(self) -> str:
        return self._k("val:version")

    @property
    def weights(self) -> str:
        return self._k("weights")

    @property
    def weights_published(self) -> str:
        """Pub/Sub channel: a message (the document's step) each time the weights document is replaced."""
        return self._k("weights:published")

    @property
    def trainer(self) -> str:
        return self._k("trainer")

    @property
    def quarantine(self) -> str:
        return self._s("quarantine")

    @property
    def lease(self) -> str:
        return self._k("trainer:lease")

    @property
    def fence(self) -> str:
        return self._k("trainer:fence")

    @property
    def downloads(self) -> str:
        return self._k("downloads")

    @property
    def checkpoint_version(self) -> str:
        return self._k("checkpoint:version")
