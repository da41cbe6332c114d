"""Estimation apart from training: what a never-scored sample gets, and a bounded unscored queue."""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.sampler import Sampler
from trainer.settings import TrainerSettings
from trainer.table import WeightTable


def sampler(**overrides: Any) -> Sampler:
    settings = TrainerSettings(_env_file=None, model="mlp", **overrides)  # type: ignore[call-arg]
    return Sampler(settings, np.random.default_rng(0))


def test_a_new_sample_starts_at_its_sources_current_weight_not_at_full_weight() -> None:
    t, s = WeightTable(), sampler()
    t.add(np.arange(4), np.arange(4, dtype=np.uint64), ["bad", "bad", "good", "good"])
    s.reweight(t, np.array([0.1, 0.1, 1.9, 1.9], dtype=np.float32))
    rows = t.add(np.arange(4, 7), np.arange(4, 7, dtype=np.uint64), ["bad", "good", "new"])
    np.testing.assert_allclose(t.weight[rows], [0.1, 1.9, 1.0], rtol=1e-6)
    mass = t.tree.values(rows)
    assert mass[0] < 0.1 * mass[1]  # drawn (until the next reweight) in proportion to that weight


def test_the_unscored_queue_is_bounded_and_keeps_sources_not_yet_estimated_whole() -> None:
    t, s = WeightTable(), sampler(max_unscored=100, source_scoring_target=10)
    t.add(np.arange(200), np.arange(200, dtype=np.uint64), ["old"] * 200)
    t.count_first_scores(np.arange(10))  # ten of "old"'s samples scored: it is estimated
    t.cols["visits"][:10] = 1
    t.add(np.arange(200, 250), np.arange(200, 250, dtype=np.uint64), ["new"] * 50)
    assert len(t.unscored) == 250
    assert s.bound_queue(t) == 150
    queued = t.unscored.array()
    assert len(queued) == 100 and np.all(np.diff(queued) > 0)  # arrival order kept
    assert set(range(200, 250)) <= set(queued.tolist())  # the unestimated source keeps every sample queued
    old = queued[queued < 200]
    assert len(old) == 50 and old.max() > 150 and old.min() < 50  # a random subsample, not the newest
    assert t.live == 250  # nothing left the table: the others are drawn by their source's weight
