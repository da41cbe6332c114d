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


def test_a_well_estimated_sources_queued_samples_are_scored_in_proportion_to_their_weight() -> None:
    """Scoring goes where the weight is: a source weighted down to 0.1 has about a tenth of its queued
    samples scored (a random subsample, the rest leave the queue and stay in the table), a source at full
    weight all of them, and a source not yet estimated all of them whatever its weight."""
    t, s = WeightTable(), sampler(source_scoring_target=10)
    t.add(np.arange(3000), np.arange(3000, dtype=np.uint64), ["flood", "good", "young"] * 1000)
    t.count_first_scores(np.arange(60))  # flood and good: 20 scored each; young: 20 too, but target raised
    t.cols["visits"][:60] = 1
    young = t.source_id("young")
    t.scored_per_source[young] = 5  # below the target: not estimated
    w = np.tile(np.array([0.1, 1.45, 1.45], dtype=np.float32), 1000)  # live weights average 1
    s.reweight(t, w)
    taken = []
    for _ in range(100):  # 32 queued rows a batch: enough batches to empty the queue
        d = s.draw(t, _Cache(), from_queue=True)
        taken.append(d.rows[d.queued])  # the rows that came from the queue
    queued = np.concatenate(taken)
    src = np.array(t.sources)[t.source[queued]]
    n_flood, n_good, n_young = (int((src == name).sum()) for name in ("flood", "good", "young"))
    assert n_good == n_young == 1000  # full weight, and not estimated: every queued sample taken
    assert 50 < n_flood < 160  # weight 0.1 of the mean: about a tenth of flood's 1,000
    assert len(t.unscored) == 0 and t.live == 3000  # the others left the queue, not the table


class _Cache:
    """Payloads by ordinal: every sample is there (the sampler only needs to know it was not evicted)."""

    def get(self, ordinals: np.ndarray) -> list[dict[str, Any]]:
        return [{"id": str(o)} for o in ordinals]


def test_weighted_scoring_off_takes_the_queue_in_arrival_order() -> None:
    t, s = WeightTable(), sampler(source_scoring_target=1, weighted_scoring=False)
    t.add(np.arange(100), np.arange(100, dtype=np.uint64), ["a"] * 100)
    t.count_first_scores(np.arange(5))
    s.reweight(
        t, np.full(100, 0.01, dtype=np.float32) * np.r_[np.ones(50), 199 * np.ones(50)].astype(np.float32)
    )
    rows = t.take_unscored(40)
    assert rows.tolist() == list(range(40))


def test_each_half_of_a_batch_carries_its_share_of_the_loss_whatever_the_queued_rows_weigh() -> None:
    """Queued rows' coefficient is their weight, drawn rows' w / (n q), about 1: without per-half
    normalisation, a queue of clean rows weighing 6 (beside a flood weighing nothing) took 6/7 of the
    loss and the batch trained like half its size."""
    t, s = WeightTable(), sampler(source_scoring_target=1000, split_importance=True)
    t.add(np.arange(600), np.arange(600, dtype=np.uint64), ["clean"] * 100 + ["flood"] * 500)
    s.reweight(t, np.r_[np.full(100, 5.99), np.full(500, 0.002)].astype(np.float32))
    d = s.draw(t, _Cache(), from_queue=True)
    assert d.queued.sum() == 32 and (~d.queued).sum() == 32
    np.testing.assert_allclose(d.importance[d.queued].sum(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(d.importance.sum(), 1.0, rtol=1e-6)
