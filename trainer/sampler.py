"""The sampler: draw probabilities from the weights, and each step's batch with its importance weights.

A batch is ``unscored_fraction`` of rows from the unscored queue (samples scored fewer than ``min_visits``
times, oldest first; a well-estimated source's queued rows are taken in proportion to their weight, the
rest leave the queue: ``_by_weight``) on scoring steps, the rest drawn from the sum tree with probability

    q_i = (1 - explore) w_i / sum_j w_j + explore / n_live            an exploration floor (explore)

and every row's loss coefficient is its importance weight, so the step's expected gradient is the
weighted one whatever was drawn (importance sampling, as in prioritized replay, Schaul et al. 2016):

    c_i = w_i / (n_live q_i)      drawn rows          c_i = w_i      queued rows
    c  <- with ``split_importance`` (off by default): c scaled so that each half (queued, drawn) sums
          to its number of rows (self-normalised importance sampling per half: each estimates the
          weighted loss, and neither drowns the other)
    c  <- max(c / sum c, IMPORTANCE_FLOOR), renormalised to sum to 1
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.intake import MISSING, PayloadCache
from trainer.settings import TrainerSettings
from trainer.table import RowQueue, WeightTable
from trainer.weighting.base import IMPORTANCE_FLOOR


@dataclass
class Draw:
    """One batch: rows (B,), importance weights (B,) summing to 1 (the loss coefficients), which rows came
    from the unscored queue (B,), and the payloads."""

    rows: np.ndarray
    importance: np.ndarray
    queued: np.ndarray
    payloads: list[dict[str, Any]]


class Sampler:
    def __init__(self, settings: TrainerSettings, rng: np.random.Generator) -> None:
        self.settings = settings
        self.rng = rng  # shared with the validation batches: one stream, saved in the trainer state

    def reweight(self, table: WeightTable, weights: np.ndarray) -> None:
        """Take every row's new weight (dead rows 0) and set the draw probabilities q from it; each
        source's mean live weight becomes what its next new samples start at (``source_weight``)."""
        table.cols["weight"][: table.n] = weights
        alive = table.alive
        src = table.source[alive].astype(np.int64)
        count = np.bincount(src, minlength=len(table.sources))
        total = np.bincount(src, weights=weights[alive].astype(np.float64), minlength=len(table.sources))
        table.source_weight = np.where(count > 0, total / np.maximum(count, 1), 1.0).astype(np.float32)
        explore = self.settings.explore
        probs = (1 - explore) * weights / max(float(weights.sum()), 1e-12) + explore * table.alive / max(
            table.live, 1
        )
        table.set_sampling(np.where(table.alive, probs, 0.0))

    def bound_queue(self, table: WeightTable) -> int:
        """Keep the unscored queue within ``max_unscored``: past it, a random subsample of the queued rows
        of well-estimated sources (at least ``source_scoring_target`` samples scored) stays, in arrival
        order; rows of sources not yet estimated always stay. The rows left out stay in the table, drawn by
        their source's weight. Returns how many left the queue."""
        bound, q = self.settings.max_unscored, table.unscored
        if len(q) <= bound:
            return 0
        queued = q.array()
        src = table.source[queued].astype(np.int64)
        scored = np.zeros(len(table.sources), dtype=np.int64)
        scored[: len(table.scored_per_source)] = table.scored_per_source
        estimated = scored[src] >= self.settings.source_scoring_target  # (queue length,)
        room = max(0, bound - int((~estimated).sum()))
        candidates = np.flatnonzero(estimated)
        keep = np.ones(len(queued), dtype=bool)
        if len(candidates) > room:
            drop = self.rng.choice(candidates, size=len(candidates) - room, replace=False)
            keep[drop] = False
        table.unscored = RowQueue(queued[keep])
        return int((~keep).sum())

    def _by_weight(self, table: WeightTable) -> Callable[[np.ndarray], np.ndarray] | None:
        """The scoring budget's filter on the unscored queue (``weighted_scoring``): a queued row of a
        well-estimated source (``source_scoring_target`` samples scored) is taken with probability
        min(1, w_i / mean live weight), else it leaves the queue and stays in the table, drawn by its
        weight. Scoring then goes where the weight is, and a source weighted down is scored on a random
        subsample of its arrivals in proportion to its weight, enough to keep its estimate and to find
        its good samples, instead of every one of its samples three times (on the redundancy stream,
        83% of the arrivals are a flood that weighs nothing, and filled nearly half of every batch)."""
        if not self.settings.weighted_scoring:
            return None
        scored = np.zeros(len(table.sources), dtype=np.int64)
        scored[: len(table.scored_per_source)] = table.scored_per_source[: len(table.sources)]
        estimated = scored >= self.settings.source_scoring_target  # (n_sources,)
        alive = table.alive
        mean_w = float(table.weight[alive].mean()) if alive.any() else 1.0

        def accept(rows: np.ndarray) -> np.ndarray:
            p = np.minimum(1.0, table.cols["weight"][rows].astype(np.float64) / max(mean_w, 1e-12))
            keep = ~estimated[table.cols["source"][rows].astype(np.int64)]
            return keep | (self.rng.random(len(rows)) < p)

        return accept

    def draw(self, table: WeightTable, cache: PayloadCache, *, from_queue: bool) -> Draw:
        """One batch; evicted samples are dropped (and their rows killed), samples whose payload Redis
        cannot give now are skipped (queued ones go back in the queue)."""
        s, t = self.settings, table
        n_queue = int(s.batch_size * s.unscored_fraction)
        from_q = t.take_unscored(n_queue, self._by_weight(t)) if from_queue else np.empty(0, np.int64)
        drawn = t.draw(s.batch_size - len(from_q), self.rng) if t.tree.total > 0 else np.empty(0, np.int64)
        rows = np.concatenate([from_q, drawn]).astype(np.int64)
        w = t.weight[rows].astype(np.float64)
        q = t.tree.values(drawn) / t.tree.total if len(drawn) else np.empty(0)
        # importance weights: w_i / (n q_i) for drawn rows, w_i for queued ones
        importance = np.concatenate(
            [w[: len(from_q)], w[len(from_q) :] / (max(t.live, 1) * np.maximum(q, 1e-12))]
        )
        payloads = cache.get(t.ordinal[rows])
        evicted = np.array([p is None for p in payloads], dtype=bool)
        missing = np.array([p is MISSING for p in payloads], dtype=bool)  # Redis unavailable, not cached
        if evicted.any():
            t.kill(rows[evicted])
        queued = np.arange(len(rows)) < len(from_q)
        if missing.any():
            t.unscored.extend(rows[missing & queued])  # still to be scored: back in the queue
        keep = ~(evicted | missing)
        rows, importance, queued = rows[keep], importance[keep], queued[keep]
        # split_importance: each half self-normalised, then weighted by its share of the batch, so a queue
        # of high-weight rows (coefficient w_i) does not drown the drawn half (coefficient ~1)
        if s.split_importance:
            for part in (queued, ~queued):
                total = float(importance[part].sum())
                if total > 0:
                    importance[part] *= part.sum() / total
        importance = np.maximum(importance / max(importance.sum(), 1e-12), IMPORTANCE_FLOOR)
        kept = [p for p, k in zip(payloads, keep, strict=True) if k]
        return Draw(rows, importance / importance.sum(), queued, kept)
