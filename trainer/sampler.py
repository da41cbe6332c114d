"""The sampler: draw probabilities from the weights, and each step's batch with its importance weights.

A batch is ``unscored_fraction`` of rows from the unscored queue (samples scored fewer than ``min_visits``
times, oldest first) on scoring steps, the rest drawn from the sum tree with probability

    q_i = (1 - explore) w_i / sum_j w_j + explore / n_live            an exploration floor (explore)

and every row's loss coefficient is its importance weight, so the step's expected gradient is the
weighted one whatever was drawn (importance sampling, as in prioritized replay, Schaul et al. 2016):

    c_i = w_i / (n_live q_i)      drawn rows          c_i = w_i      queued rows
    c  <- max(c / sum c, IMPORTANCE_FLOOR), renormalised to sum to 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.intake import MISSING, PayloadCache
from trainer.settings import TrainerSettings
from trainer.table import WeightTable
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
        """Take every row's new weight (dead rows 0) and set the draw probabilities q from it."""
        table.cols["weight"][: table.n] = weights
        explore = self.settings.explore
        probs = (1 - explore) * weights / max(float(weights.sum()), 1e-12) + explore * table.alive / max(
            table.live, 1
        )
        table.set_sampling(np.where(table.alive, probs, 0.0))

    def draw(self, table: WeightTable, cache: PayloadCache, *, from_queue: bool) -> Draw:
        """One batch; evicted samples are dropped (and their rows killed), samples whose payload Redis
        cannot give now are skipped (queued ones go back in the queue)."""
        s, t = self.settings, table
        n_queue = int(s.batch_size * s.unscored_fraction)
        from_q = t.take_unscored(n_queue) if from_queue else np.empty(0, np.int64)
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
        importance = np.maximum(importance / max(importance.sum(), 1e-12), IMPORTANCE_FLOOR)
        kept = [p for p, k in zip(payloads, keep, strict=True) if k]
        return Draw(rows, importance / importance.sum(), queued, kept)
