"""The bilevel rule's bookkeeping, pinned on hand-made scores: copy sharing, score reliability, drift."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.trainer.conftest import MLP, blobs
from trainer.loop import Trainer
from trainer.publish import weights_document
from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.weighting.base import BatchRecord, shared_weights
from trainer.weighting.bilevel import UNKNOWN_PRIOR_VISITS, Bilevel


def bilevel(**overrides: Any) -> Bilevel:
    values: dict[str, Any] = {"model": "mlp", "model_params": MLP, **overrides}
    return Bilevel(TrainerSettings(_env_file=None, **values))  # type: ignore[call-arg]


def test_one_sources_copies_share_a_weight_but_other_sources_copies_do_not() -> None:
    t = WeightTable()
    # rows 0-3: one content posted 3x by "spam" and once by "other"; row 4: other content by "other"
    sources = ["spam", "spam", "spam", "other", "other"]
    t.add(np.arange(5), np.array([7, 7, 7, 7, 9], dtype=np.uint64), sources)
    w = shared_weights(t, np.zeros(5), natural=False)
    assert np.allclose(w[:3], 1 / 3)  # three copies from one source weigh what one sample does
    assert w[3] == 1.0 and w[4] == 1.0  # the same content from another source keeps its own weight


def test_a_flood_shares_one_weight_but_natural_repetition_keeps_a_weight_per_copy() -> None:
    """Copies beyond what the other sources' rate of that content predicts share one weight; copies that
    recur as often as everyone's do (a long stream over a finite set of problems) are not spam."""
    t = WeightTable()
    # "a" and "b" each post contents 0-9 five times (the same pool, natural repetition); "a" also posts
    # content 200 once, which "spam" posts ten times
    groups = [g for g in range(10) for _ in range(5)]
    t.add(np.arange(50), np.array(groups, dtype=np.uint64), ["a"] * 50)
    t.add(np.arange(50, 100), np.array(groups, dtype=np.uint64), ["b"] * 50)
    t.add(np.arange(100, 101), np.array([200], dtype=np.uint64), ["a"])
    t.add(np.arange(101, 111), np.full(10, 200, dtype=np.uint64), ["spam"] * 10)
    w = shared_weights(t, np.zeros(t.n))
    assert np.all(w[:100] > 0.8)  # about as often as the other source posts them: (nearly) a full weight
    np.testing.assert_allclose(w[101:], 1 / 10)  # the flood: one sample's weight for all ten copies
    assert w[100] == 1.0
    np.testing.assert_allclose(shared_weights(t, np.zeros(t.n), natural=False)[:100], 1 / 5)  # the old rule


def feed(rule: Bilevel, t: WeightTable, true: np.ndarray, noise: float, rounds: int, seed: int) -> None:
    """``rounds`` passes over every row in batches of 64, each visit scoring true_i + N(0, noise^2)."""
    rng = np.random.default_rng(seed)
    rule.attach(t)  # the rule's per-row columns (idempotent)
    for step in range(rounds):
        for start in range(0, t.n, 64):
            rows = np.arange(start, min(start + 64, t.n))
            dots = true[rows] + rng.normal(0, noise, size=len(rows))
            rule.observe(
                t,
                BatchRecord(
                    step, rows, np.full(len(rows), 1 / len(rows)), [], None, dots, np.ones(len(rows)), 1.0
                ),
            )


def test_per_sample_term_is_off_until_revisits_measure_the_scores_reliability() -> None:
    rule, t = bilevel(), WeightTable()
    t.add(np.arange(640), np.arange(640, dtype=np.uint64), ["s"] * 640)
    feed(rule, t, np.zeros(640), 0.1, rounds=1, seed=0)  # first visits only
    assert rule.prior_visits == UNKNOWN_PRIOR_VISITS


def test_consistent_scores_are_trusted_and_pure_noise_is_not() -> None:
    true = np.where(np.arange(640) % 2 == 0, 0.2, -0.2)  # two kinds of samples, far apart
    steady, noisy = bilevel(), bilevel()
    t1, t2 = WeightTable(), WeightTable()
    for t in (t1, t2):
        t.add(np.arange(640), np.arange(640, dtype=np.uint64), ["s"] * 640)
    feed(steady, t1, true, 0.05, rounds=4, seed=1)  # visit noise far below the spread between samples
    feed(noisy, t2, np.zeros(640), 0.2, rounds=4, seed=2)  # no difference between samples at all
    assert steady.prior_visits < 2.5  # at its floor (sample_prior_visits): the scores are reliable
    assert noisy.prior_visits > 20  # the sample term is shrunk to almost nothing
    z_steady = steady.logits(t1, step=10_000)
    z_noisy = noisy.logits(t2, step=10_000)
    assert np.all(z_steady[true > 0] > z_steady[true < 0].max())
    assert np.ptp(z_noisy) < 0.3 * np.ptp(z_steady)


def clean_buffer(api: TestClient, n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    """Post ``n`` clean mlp samples of source "a" and make the first 64 the validation set; the samples."""
    samples = blobs(n, seed, source="a", noisy=False, prefix=prefix)
    assert api.post("/v1/samples", json={"samples": samples}).status_code == 202
    assert api.put("/v1/validation", json={"samples": samples[:64]}).status_code == 200
    return samples


def test_a_new_validation_set_drops_the_queue_of_samples_that_arrived_before_it(
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP))
    old = clean_buffer(api, 2000, 21, "old")
    trainer = make_trainer(max_steps=5)
    trainer.run()
    assert len(trainer.table.unscored) > 1000  # the backlog: most of the 2,000 are not scored yet
    assert api.put("/v1/validation", json={"samples": old[64:128]}).status_code == 200
    new = blobs(100, 22, source="a", noisy=False, prefix="new")
    assert api.post("/v1/samples", json={"samples": new}).status_code == 202
    trainer.poll()
    trainer.refresh_validation()
    queued = trainer.table.ordinal[trainer.table.unscored.array()]
    assert len(queued) == 100  # only what arrived with the new task is queued to be scored first
    assert set(queued.tolist()).isdisjoint(trainer.table.ordinal[:2000].tolist())
    # ... and it forms a new cohort of source "a", estimated apart from a's older samples
    t = trainer.table
    assert t.sources == ["a", "a"] and t.source_cohorts == [0, 1]
    assert set(t.source[2000:].tolist()) == {1} and set(t.source[:2000].tolist()) == {0}


def test_a_sources_cohorts_are_estimated_apart_but_published_as_one_source() -> None:
    t = WeightTable()
    t.add(np.arange(4), np.arange(4, dtype=np.uint64), ["a", "a", "b", "b"])
    t.new_cohort()
    t.add(np.arange(4, 6), np.arange(4, 6, dtype=np.uint64), ["a", "b"])
    assert t.source.tolist() == [0, 0, 1, 1, 2, 3]  # (a, 0), (b, 0), (a, 1), (b, 1)
    t.cols["weight"][:6] = [1.0, 1.0, 1.0, 1.0, 2.0, 0.0]
    doc = weights_document(t, step=1, method="bilevel")
    assert doc["sources"] == {"a": 4 / 6, "b": 2 / 6}
    assert doc["source_stats"]["a"] == {"count": 3, "mean_weight": 4 / 3}
    arrays, info = t.state()
    back = WeightTable.from_state(arrays, info)
    assert back.sources == t.sources and back.source_cohorts == [0, 0, 1, 1] and back.cohort == 1
    assert back.source_id("a") == 2  # new samples of "a" still join its current cohort


def test_the_queue_holds_each_sample_once_until_it_has_its_visits(
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP))
    clean_buffer(api, 300, 23, "q")
    trainer = make_trainer(max_steps=12)  # 12 x 32 queue slots: the 300 first visits and some second ones
    trainer.run()
    t, min_visits = trainer.table, trainer.settings.min_visits
    queued = t.unscored.array()
    assert len(queued) == len(np.unique(queued))  # a sample drawn by weight while queued is not queued again
    short = np.flatnonzero(t.visits[: t.n] < min_visits)
    assert set(short.tolist()) <= set(queued.tolist())  # every sample still short of its visits is queued
    assert 0 < len(queued) < 300


@pytest.mark.parametrize("reset", [True, False])
def test_a_new_validation_set_restarts_the_optimizers_moments_unless_told_not_to(
    reset: bool,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP))
    samples = clean_buffer(api, 300, 24, "r")
    trainer = make_trainer(max_steps=5, reset_optimizer_on_validation_change=reset)
    trainer.run()
    assert len(trainer.learner.opt.state) > 0  # AdamW keeps moments for every parameter it has stepped
    trainer.refresh_validation()  # the same version: nothing changes
    assert len(trainer.learner.opt.state) > 0
    assert api.put("/v1/validation", json={"samples": samples[64:128]}).status_code == 200
    trainer.refresh_validation()
    assert (len(trainer.learner.opt.state) == 0) is reset
    trainer.settings.max_steps = 6
    trainer.run()  # and training goes on from fresh moments
    assert trainer.step == 6 and len(trainer.learner.opt.state) > 0
