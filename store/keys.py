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

The prefix ``p`` defaults to ``dd``. All keys of one deployment share the hash tag ``{p}`` so that a Redis
Cluster (``DATADIET_REDIS_URL=redis+cluster://host:port``, store/redis_client.py) keeps them in one slot:
Redis refuses a script or MULTI whose keys are in different slots (CROSSSLOT), and the buffer's invariants
are such scripts (store/scripts.py): INGEST does dedup (ids), insert (samples, seq), the trainer's stream
entry (ingest) and eviction down to capacity (rank, counters, evictions) atomically; the trainer's writes
check the lease in the same script; ``weights:published`` is passed as a key to the script that publishes
on it, so it too must share the tag. The price: one deployment's buffer is one master's memory and one
master's thread, whatever the cluster's size (docs/scaling.md, "Redis Cluster", with measurements and the
design, not built, for sharding a buffer over several tags).
"""

from __future__ import annotations

from dataclasses import dataclass

TRAINER_GROUP = "trainer"
"""Consumer group through which trainers read the ingest stream."""

UNWEIGHTED_PRIORITY = 1e12
"""Eviction-priority offset for samples without a published weight: they sort after every weighted one
(so the trainer's lowest weights are evicted first, then the oldest unweighted samples)."""


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "dd"

    def _k(self, name: str) -> str:
        return f"{{{self.prefix}}}:{name}"

    @property
    def ids(self) -> str:
        return self._k("ids")

    @property
    def samples(self) -> str:
        return self._k("samples")

    @property
    def seq(self) -> str:
        return self._k("seq")

    @property
    def ingest(self) -> str:
        return self._k("ingest")

    @property
    def evictions(self) -> str:
        return self._k("evictions")

    @property
    def priority(self) -> str:
        """The eviction priority zset (key name ``rank``, kept for existing deployments)."""
        return self._k("rank")

    @property
    def counters(self) -> str:
        return self._k("counters")

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
        return self._k("quarantine")

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
