"""The weight table: one row per live sample, a few bytes each, and the sum tree that samples batches.

Per row: the sample's ordinal (int64, the key of its payload in Redis), its content group (uint64: identical
content shares it), its source (uint16 index into ``sources``), how often it was scored (uint16: scored
visits, counted by the loop) and its weight (float32); plus the columns the weighting rule declares for
its own per-row statistics (``add_column``; bilevel: a float32 score sum and a uint16 evidence count).
Rows of evicted samples are marked dead (sampling value 0) and compacted away when they pile up. Memory:
8 + 8 + 2 + 2 + 1 + 4 = 25 bytes a row, the weight last published (4), the rule's (bilevel: 6), and the
sum tree's ~8.5: ~44 bytes per live sample. A row in the unscored queue holds its sample's arrival time
there too (16-32 bytes a queued row with its index), for freshness: the time from a sample's POST to its
first training use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from store.keys import SHARD_BITS
from trainer.sumtree import SumTree

_FIELDS: dict[str, Any] = {
    "ordinal": np.int64,
    "group": np.uint64,
    "source": np.uint16,
    "visits": np.uint16,  # scored visits
    "alive": np.bool_,
    "weight": np.float32,
    # the weight last written to Redis (trainer/publish.py: only rows whose weight moved are rewritten);
    # NaN: not since this process started. Not saved: a restarted trainer publishes everything once
    "published": np.float32,
}
_NOT_COLUMNS = frozenset(
    {"fresh", "fresh_arrival", "sampling", "source_weight", "scored_per_source"}
)  # not per-row


class RowQueue:
    """A FIFO of row indices, each with its sample's arrival time (unix ms; 0: unknown, or a row queued
    again after its first use), in two int64 buffers: 16-32 bytes a queued row (a deque of Python ints
    alone: ~40).

    Quacks like the ``deque[int]`` it replaces where the trainer uses it: ``extend``, ``len``, iteration,
    ``clear``."""

    def __init__(self, rows: Any = (), arrivals: np.ndarray | None = None) -> None:
        self._buf = np.empty(16, dtype=np.int64)
        self._arr = np.zeros(16, dtype=np.int64)
        self._head = self._tail = 0
        self.extend(rows, arrivals)

    def __len__(self) -> int:
        return self._tail - self._head

    def __iter__(self) -> Iterator[int]:
        return iter(self._buf[self._head : self._tail].tolist())

    def array(self) -> np.ndarray:
        return self._buf[self._head : self._tail].copy()

    def arrivals(self) -> np.ndarray:
        """The queued rows' arrival times (unix ms, 0: unknown), in queue order."""
        return self._arr[self._head : self._tail].copy()

    def subset(self, keep: np.ndarray) -> RowQueue:
        """A queue of the rows where ``keep`` (a bool mask over the queue) holds, with their arrivals."""
        return RowQueue(self.array()[keep], self.arrivals()[keep])

    def clear(self) -> None:
        self._head = self._tail = 0

    def extend(self, rows: Any, arrivals: np.ndarray | None = None) -> None:
        """Queue ``rows`` (oldest first) with their arrival times (unix ms; None: unknown)."""
        rows = (
            np.fromiter(rows, dtype=np.int64) if not isinstance(rows, np.ndarray) else rows.astype(np.int64)
        )
        n, k = len(self), len(rows)
        if self._tail + k > len(self._buf):
            size = len(self._buf) if n + k <= len(self._buf) // 2 else 2 * (n + k)
            buf, arr = np.empty(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
            buf[:n] = self._buf[self._head : self._tail]  # slide to the front (or into a bigger buffer)
            arr[:n] = self._arr[self._head : self._tail]
            self._buf, self._arr, self._head, self._tail = buf, arr, 0, n
        self._buf[self._tail : self._tail + k] = rows
        self._arr[self._tail : self._tail + k] = 0 if arrivals is None else arrivals
        self._tail += k

    def pop(self, k: int) -> np.ndarray:
        """The oldest ``k`` rows (fewer if there are not that many), removed."""
        return self.pop_with_arrivals(k)[0]

    def pop_with_arrivals(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest ``k`` rows (fewer if there are not that many) and their arrival times, removed."""
        end = self._head + min(k, len(self))
        out = self._buf[self._head : end].copy(), self._arr[self._head : end].copy()
        self._head = end
        if self._head == self._tail:
            self.clear()
        return out


class WeightTable:
    def __init__(self, capacity: int = 1024) -> None:
        self.n = 0  # rows in use (live and dead)
        self.cols: dict[str, np.ndarray] = {k: np.zeros(capacity, dtype=t) for k, t in _FIELDS.items()}
        # a source index is a (name, cohort) pair: samples that arrived under different validation sets
        # (cohorts) are estimated apart, so a task change can tell the old data from the new within a
        # source; everything shown to users is aggregated by name
        self.sources: list[str] = []  # name per index (a name repeats once per cohort)
        self.source_cohorts: list[int] = []
        self.cohort = 0  # the cohort new samples join
        self._source_index: dict[tuple[str, int], int] = {}
        self.tree = SumTree(capacity)
        self.unscored = RowQueue()  # rows never scored yet, oldest first
        # (row, arrival ms) of queued rows taken into the batch being trained, until the loop reads them
        # (``take_first_uses``) once the step is done: their first training use
        self._taken: list[tuple[np.ndarray, np.ndarray]] = []
        self.evicted = 0  # rows dropped because their sample left the buffer
        self._live = 0  # alive rows, kept by add/kill/compact: ``live`` is read several times a step
        self._max_ordinal = -1  # no ordinal above this is in the table (stream ordinals only grow)
        # per shard of a sharded buffer (ordinal >> SHARD_BITS): its newest ordinal added, -1 for none (each
        # shard's ordinals only grow; across shards they interleave)
        self._max_by_shard = np.full(1, -1, dtype=np.int64)
        self._sorted = True  # rows are in ordinal order (true unless a re-delivered entry came late)
        # while not ``_sorted``: (rows covered, their ordinals sorted, those rows in that order), for rows_of
        self._index: tuple[int, np.ndarray, np.ndarray] | None = None
        # per source index: the mean live weight at the last reweight (what a new sample of it starts at)
        self.source_weight = np.zeros(0, dtype=np.float32)
        self.scored_per_source = np.zeros(0, dtype=np.int64)  # per source index: samples scored at least once

    # columns -----------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> np.ndarray:
        cols = self.__dict__.get("cols")
        if cols is not None and name in cols:
            return cols[name][: self.n]
        raise AttributeError(name)

    def add_column(self, name: str, dtype: Any) -> None:
        """A per-row column of zeros (a weighting rule's statistics), grown, compacted and saved with the
        rows; a no-op when it exists."""
        if name not in self.cols:
            self.cols[name] = np.zeros(len(self.cols["alive"]), dtype=dtype)

    @property
    def live(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cols.values()) + self.tree.nbytes

    def source_id(self, name: str, cohort: int | None = None) -> int:
        key = (name, self.cohort if cohort is None else cohort)
        idx = self._source_index.get(key)
        if idx is None:
            idx = self._source_index[key] = len(self.sources)
            self.sources.append(name)
            self.source_cohorts.append(key[1])
        return idx

    @property
    def max_ordinal(self) -> int:
        """The newest ordinal ever added (-1 for none): stream ordinals only grow."""
        return self._max_ordinal

    def max_ordinals(self) -> np.ndarray:
        """Per shard (index: shard), the newest ordinal ever added, -1 for none: (shards seen,) int64. One
        entry for an unsharded buffer: ``max_ordinal``."""
        return self._max_by_shard.copy()

    def unqueue_through(self, ordinal: int | np.ndarray) -> None:
        """Drop queued rows whose samples arrived at or before ``ordinal`` (they stay in the table); an
        array is per shard (``max_ordinals``): a row of shard s is dropped at or before ``ordinal[s]``."""
        queued = self.unscored.array()
        ords = self.cols["ordinal"][queued]
        if np.ndim(ordinal) == 0:
            self.unscored = self.unscored.subset(ords > int(ordinal))
            return
        through = np.asarray(ordinal, dtype=np.int64)
        shard = ords >> SHARD_BITS
        known = shard < len(through)
        limit = np.full(len(ords), -1, dtype=np.int64)
        limit[known] = through[shard[known]]
        self.unscored = self.unscored.subset(ords > limit)

    def _note_ordinals(self, ordinals: np.ndarray) -> None:
        """Raise the per-shard newest ordinals (``max_ordinals``) by these."""
        shard = ordinals >> SHARD_BITS
        top = int(shard.max()) + 1
        if top > len(self._max_by_shard):
            self._max_by_shard = np.concatenate(
                [self._max_by_shard, np.full(top - len(self._max_by_shard), -1, dtype=np.int64)]
            )
        np.maximum.at(self._max_by_shard, shard, ordinals)

    def _maybe_seen(self, ordinals: np.ndarray) -> bool:
        """Whether any of these ordinals may already be in the table: one is at or below its shard's
        newest (new stream entries are above it)."""
        shard = ordinals >> SHARD_BITS
        known = shard < len(self._max_by_shard)
        return bool(np.any(ordinals[known] <= self._max_by_shard[shard[known]]))

    def new_cohort(self) -> None:
        """Samples added from now on form a new cohort of their source (the validation set changed)."""
        self.cohort += 1

    def source_names(self) -> tuple[list[str], np.ndarray]:
        """(distinct source names, the name's position for every source index)."""
        names = list(dict.fromkeys(self.sources))
        pos = {n: i for i, n in enumerate(names)}
        return names, np.array([pos[n] for n in self.sources], dtype=np.int64)

    # growth and removal ----------------------------------------------------------------------------
    def add(
        self,
        ordinals: np.ndarray,
        groups: np.ndarray,
        sources: list[str],
        arrivals: np.ndarray | None = None,
    ) -> np.ndarray:
        """Append rows for samples not already in the table, each queued to be scored with its arrival
        time (``arrivals``: unix ms, the ingest stream entry's time; None: unknown); returns the new
        rows' indices. A new row's weight is its source's (cohort's) current mean weight
        (``source_weight``, 1 for a new source): what a sample that was never scored gets. The queue's
        bound is the sampler's (trainer/sampler.py ``bound_queue``)."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        if not len(ordinals):
            return np.empty(0, dtype=np.int64)
        # new stream entries have ordinals above every row's of their shard: skip the O(n) membership test
        seen = self.n > 0 and self._maybe_seen(ordinals)
        keep = ~np.isin(ordinals, self.ordinal) if seen else np.ones(len(ordinals), bool)
        keep &= _first_occurrence(ordinals)
        if not keep.any():
            return np.empty(0, dtype=np.int64)
        ordinals, groups = ordinals[keep], np.asarray(groups, dtype=np.uint64)[keep]
        arrived = None if arrivals is None else np.asarray(arrivals, dtype=np.int64)[keep]
        self._sorted = (
            self._sorted and int(ordinals[0]) > self._max_ordinal and bool(np.all(np.diff(ordinals) > 0))
        )
        src = np.array([self.source_id(s) for s, k in zip(sources, keep, strict=True) if k], dtype=np.uint16)
        rows = np.arange(self.n, self.n + len(ordinals))
        self._reserve(self.n + len(ordinals))
        c = self.cols
        c["ordinal"][rows], c["group"][rows], c["source"][rows] = ordinals, groups, src
        c["published"][rows] = np.nan
        for name in c.keys() - {"ordinal", "group", "source", "alive", "weight", "published"}:
            c[name][rows] = 0  # scored visits and the rule's statistics start at zero
        w = np.ones(len(rows), dtype=np.float32)
        estimated = src < len(self.source_weight)
        w[estimated] = self.source_weight[src[estimated]]
        c["alive"][rows], c["weight"][rows] = True, w
        # a new row's sampling mass is the average live row's times its weight relative to the average
        # (1): a fixed mass of 1 against normalised probabilities summing to 1 would hand nearly every draw
        # until the next reweight to whatever arrived last
        avg = self.tree.total / self._live if self._live and self.tree.total > 0 else 1.0
        mass = avg * np.maximum(w.astype(np.float64), 1e-3)
        self.n += len(rows)
        self._live += len(rows)
        self._max_ordinal = max(self._max_ordinal, int(ordinals.max()))
        self._note_ordinals(ordinals)
        self.tree.update(rows, mass)
        self.unscored.extend(rows, arrived)
        return rows

    def count_first_scores(self, rows: np.ndarray) -> None:
        """Call before counting a batch's scored visits: its rows scored for the first time count toward
        their source's ``scored_per_source``."""
        first = np.unique(rows[self.cols["visits"][rows] == 0])
        if len(first):
            n = len(self.sources)
            if len(self.scored_per_source) < n:
                self.scored_per_source = np.pad(self.scored_per_source, (0, n - len(self.scored_per_source)))
            np.add.at(self.scored_per_source, self.cols["source"][first].astype(np.int64), 1)

    def rows_of(self, ordinals: np.ndarray) -> np.ndarray:
        """The rows holding these ordinals (those not in the table are skipped): a binary search while
        the rows are in ordinal order, else a scan."""
        ordinals = np.asarray(ordinals, dtype=np.int64)
        o = self.ordinal
        if not len(o) or not len(ordinals):
            return np.empty(0, dtype=np.int64)
        if self._sorted:
            idx = np.minimum(np.searchsorted(o, ordinals), len(o) - 1)
            return idx[o[idx] == ordinals].astype(np.int64)
        # rows out of ordinal order (a sharded buffer's streams interleave): a binary search in a sorted
        # copy of the first ``covered`` rows, a scan of the rows added since; the copy is made again once
        # those are over an eighth of it (O(log n) per added row, amortised) or the rows are renumbered
        index = self._index
        if index is None or len(o) - index[0] > max(1024, index[0] // 8):
            order = np.argsort(o, kind="stable")
            index = self._index = (len(o), o[order], order)
        covered, sorted_o, order = index
        pos = np.minimum(np.searchsorted(sorted_o, ordinals), covered - 1)
        found = order[pos[sorted_o[pos] == ordinals]]
        added = np.flatnonzero(np.isin(o[covered:], ordinals)) + covered
        return np.unique(np.concatenate([found, added])).astype(np.int64)

    def kill(self, rows: np.ndarray, *, evicted: bool = True) -> None:
        """Mark rows dead: their samples were evicted from the buffer (counted in ``evicted``), or
        quarantined (``evicted=False``)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = np.unique(rows[self.cols["alive"][rows]])
        if len(rows):
            self.cols["alive"][rows] = False
            self.cols["weight"][rows] = 0
            self.tree.update(rows, np.zeros(len(rows)))
            self.evicted += len(rows) if evicted else 0
            self._live -= len(rows)

    def compact(self) -> np.ndarray | None:
        """Drop dead rows when they are over a quarter of the table; returns old->new row map or None."""
        dead = self.n - self.live
        if dead == 0 or dead < self.n // 4:
            return None
        alive = self.cols["alive"][: self.n]
        remap = np.full(self.n, -1, dtype=np.int64)
        remap[alive] = np.arange(int(alive.sum()))
        for k, col in self.cols.items():
            self.cols[k] = np.concatenate(
                [col[: self.n][alive], np.zeros(len(col) - int(alive.sum()), col.dtype)]
            )
        self.n = int(alive.sum())
        self._index = None  # rows renumbered
        self.tree = SumTree(len(self.cols["alive"]))
        kept = remap[self.unscored.array()]
        self.unscored = RowQueue(kept[kept >= 0], self.unscored.arrivals()[kept >= 0])
        self._taken.clear()  # rows taken before a compaction (none are: it runs between steps) are stale
        return remap

    def _reserve(self, needed: int) -> None:
        cap = len(self.cols["alive"])
        if needed <= cap:
            return
        while cap < needed:
            cap *= 2
        for k, col in self.cols.items():
            grown = np.zeros(cap, dtype=col.dtype)
            grown[: len(col)] = col
            self.cols[k] = grown

    # sampling --------------------------------------------------------------------------------------
    def set_sampling(self, probs: np.ndarray) -> None:
        """Sampling mass of every row (dead rows must be 0)."""
        self.tree.update(np.arange(self.n), probs)

    def draw(self, k: int, rng: np.random.Generator) -> np.ndarray:
        return self.tree.sample(k, rng)

    def take_unscored(self, k: int, accept: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Up to ``k`` live rows from the unscored queue, oldest first; with ``accept`` (rows -> (n,) bool),
        the popped rows it refuses leave the queue without being taken. The taken rows' arrival times
        are held for ``take_first_uses``."""
        out: list[np.ndarray] = []
        need, alive = k, self.cols["alive"]
        while need > 0 and len(self.unscored):
            rows, arrived = self.unscored.pop_with_arrivals(need)
            live = alive[rows]
            rows, arrived = rows[live], arrived[live]
            if accept is not None and len(rows):
                taken = accept(rows)
                rows, arrived = rows[taken], arrived[taken]
            out.append(rows)
            first = arrived > 0  # 0: queued again after a use, or arrival unknown
            if first.any():
                self._taken.append((rows[first], arrived[first]))
            need -= len(rows)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def take_first_uses(self, trained: bool) -> np.ndarray:
        """Arrival times (unix ms) of the queued samples taken since the last call that are still live:
        their first training use when the step that took them ``trained`` (else none: the batch was set
        aside or empty, and they are forgotten). Clears what it returns."""
        taken, self._taken = self._taken, []
        if not trained or not taken:
            return np.empty(0, dtype=np.int64)
        rows = np.concatenate([r for r, _ in taken])
        arrived = np.concatenate([a for _, a in taken])
        return arrived[self.cols["alive"][rows]]  # evicted when its payload was fetched: never used

    # persistence -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {k: np.ascontiguousarray(v[: self.n]) for k, v in self.cols.items() if k != "published"}
        arrays["fresh"] = self.unscored.array()
        arrays["fresh_arrival"] = self.unscored.arrivals()
        arrays["sampling"] = self.tree.values()[: self.n]  # the draw probabilities, exactly as they were
        arrays["source_weight"] = self.source_weight
        arrays["scored_per_source"] = self.scored_per_source
        info = {"sources": self.sources, "cohorts": self.source_cohorts, "cohort": self.cohort}
        sizes = {"capacity": len(self.cols["alive"]), "tree_capacity": self.tree.capacity}
        return arrays, {**info, **sizes, "evicted": self.evicted}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> WeightTable:
        n = len(arrays["ordinal"])
        t = cls(max(1024, n, int(info.get("capacity", 0))))
        # the same tree shape as the saved run's: its sums, and so its draws, come out bit for bit the same
        t.tree = SumTree(max(len(t.cols["alive"]), int(info.get("tree_capacity", 0))))
        for k, saved in arrays.items():
            if k not in _NOT_COLUMNS:
                t.add_column(k, saved.dtype)
                t.cols[k][:n] = saved
        t.n = n
        t.cols["published"][:n] = np.nan
        t._live = int(t.alive.sum())
        t._max_ordinal = int(t.ordinal.max()) if n else -1
        if n:
            t._note_ordinals(np.asarray(t.ordinal, dtype=np.int64))
        t._sorted = bool(np.all(np.diff(t.ordinal) > 0))
        cohorts = info.get("cohorts") or [0] * len(info["sources"])
        for s, c in zip(info["sources"], cohorts, strict=True):
            t.source_id(s, c)
        t.cohort = int(info.get("cohort", 0))
        t.evicted = int(info.get("evicted", 0))
        fresh = np.asarray(arrays["fresh"], dtype=np.int64)
        arrived = arrays.get("fresh_arrival")  # absent from states saved before it was
        t.unscored = RowQueue(fresh, None if arrived is None or len(arrived) != len(fresh) else arrived)
        t.source_weight = np.asarray(arrays.get("source_weight", np.zeros(0)), dtype=np.float32)
        t.scored_per_source = np.asarray(arrays.get("scored_per_source", np.zeros(0)), dtype=np.int64)
        if "sampling" in arrays and len(arrays["sampling"]) == n:
            t.set_sampling(np.asarray(arrays["sampling"], dtype=np.float64))
        else:  # a state saved before the sampling column was
            t.set_sampling(np.where(t.alive, np.maximum(t.weight, 1e-6), 0.0))
        return t


def _first_occurrence(x: np.ndarray) -> np.ndarray:
    _, first = np.unique(x, return_index=True)
    mask = np.zeros(len(x), dtype=bool)
    mask[first] = True
    return mask
