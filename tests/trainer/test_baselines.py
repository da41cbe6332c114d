"""The baseline weighting rules the quality benchmark compares against: each test pins the rule itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.trainer.conftest import MLP, blobs
from trainer.hypergrad import reference_scores, val_grad
from trainer.loop import Trainer
from trainer.models import build_model
from trainer.models.base import to_device
from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.weighting import METHODS, BatchRecord, Weighting
from trainer.weighting.l2rw import L2RW, l2rw_coef
from trainer.weighting.loss import LossWeighting
from trainer.weighting.rholoss import IL_STEPS, SELECT_FRACTION, RhoLoss, select_top, train_irreducible

CLEAN = blobs(300, 11, source="clean", noisy=False, prefix="c")
NOISY = blobs(300, 12, source="noisy", noisy=True, prefix="n")
VALIDATION = blobs(64, 13, source="val", noisy=False, prefix="v")


def settings(**overrides: Any) -> TrainerSettings:
    values: dict[str, Any] = {"model": "mlp", "model_params": MLP, **overrides}
    return TrainerSettings(_env_file=None, **values)  # type: ignore[call-arg]


def table_of(n: int, sources: list[str] | None = None, rule: Weighting | None = None) -> WeightTable:
    t = WeightTable()
    if rule is not None:
        rule.attach(t)
    t.add(np.arange(n), np.arange(n, dtype=np.uint64), sources or ["s"] * n)
    return t


def record(rows: list[int], step: int = 0, **arrays: Any) -> BatchRecord:
    """A batch record of ``rows`` with uniform coefficients and ``arrays`` (losses, dots, norms, g_norm)."""
    r = np.array(rows)
    return BatchRecord(step, r, np.full(len(r), 1 / len(r)), [{}] * len(r), **arrays)


@pytest.mark.parametrize("name", ["loss", "l2rw", "rholoss"])
def test_baselines_are_registered_by_name(name: str) -> None:
    assert METHODS[name].name == name


# ------------------------------------------------------------------ loss


def test_loss_weights_are_proportional_to_each_samples_running_loss() -> None:
    rule = LossWeighting(settings())
    t = table_of(4, rule=rule)
    rule.observe(t, record([0, 1, 2], losses=np.array([1.0, 2.0, 3.0])))
    w = rule.weights(t, step=1)
    # visited rows in proportion to their loss; the unvisited row takes the mean loss (2.0)
    np.testing.assert_allclose(w / w[0], [1.0, 2.0, 3.0, 2.0], rtol=1e-6)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)


def test_loss_running_mean_moves_halfway_to_each_new_loss() -> None:
    rule = LossWeighting(settings())
    t = table_of(2, rule=rule)
    rule.observe(t, record([0, 1], losses=np.array([4.0, 1.0])))
    rule.observe(t, record([0], step=1, losses=np.array([0.0])))  # row 0: 0.5 * 4 + 0.5 * 0 = 2
    w = rule.weights(t, step=2)
    assert w[0] / w[1] == pytest.approx(2.0)
    assert list(rule.col(t, "visits")[: t.n]) == [2, 1]


def test_loss_weights_are_uniform_before_any_loss_is_seen() -> None:
    rule = LossWeighting(settings())
    w = rule.weights(table_of(3, rule=rule), step=0)
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])


# ------------------------------------------------------------------ l2rw


def test_l2rw_gives_zero_weight_to_gradients_opposing_the_validation_gradient() -> None:
    w = l2rw_coef(np.array([2.0, -5.0, 1.0, 0.0]))
    np.testing.assert_allclose(w, [2 / 3, 0.0, 1 / 3, 0.0], atol=1e-7)
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()  # floored, as the loop requires


def test_l2rw_batch_with_no_helpful_sample_is_trained_uniformly() -> None:
    np.testing.assert_allclose(l2rw_coef(np.array([-1.0, -2.0, 0.0, -0.1])), [0.25] * 4)


def test_l2rw_zeroes_a_real_sample_whose_label_contradicts_the_validation_set() -> None:
    """Real per-sample gradients of an MLP: G_val from (x, y); the batch holds (x, y) and (x, y') with
    y' wrong. The wrong label's gradient opposes G_val and gets no weight."""
    torch.manual_seed(0)
    model = build_model("mlp", MLP)
    x = CLEAN[0]
    wrong = {**x, "target": (x["target"] + 1) % 4}
    _, g_val = val_grad(model, model.collate([x]))
    dots, _ = reference_scores(model, model.collate([x, wrong]), g_val)
    assert dots[0] > 0 > dots[1]  # the setting this test needs
    w = L2RW(settings()).batch_importance(table_of(2), record([0, 1], losses=np.zeros(2), dots=dots.numpy()))
    assert w is not None
    np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-7)


def test_l2rw_keeps_no_memory_between_batches() -> None:
    rule, t = L2RW(settings()), table_of(3)
    rule.observe(t, record([0, 1, 2], dots=np.array([1.0, -1.0, 0.5]), norms=np.ones(3), g_norm=1.0))
    np.testing.assert_array_equal(rule.weights(t, step=1), [1.0, 1.0, 1.0])
    assert rule.batch_importance(t, record([0], losses=np.zeros(1))) is None  # no G_val yet


# ------------------------------------------------------------------ rholoss


def test_rholoss_selects_the_top_fraction_by_reducible_loss() -> None:
    w = select_top(np.array([0.1, 3.0, -1.0, 2.0, 0.5, 0.0, 0.2, 1.0]), 0.25)
    assert set(np.flatnonzero(w > 0.01)) == {1, 3}  # the two highest of eight
    np.testing.assert_allclose(w[[1, 3]], 0.5, rtol=1e-6)
    assert w.sum() == pytest.approx(1.0) and (w > 0).all()


def test_irreducible_model_fits_the_validation_set_and_leaves_the_global_rng_alone() -> None:
    s = settings()
    torch.set_num_threads(1)  # as the trainer does (DATADIET_TORCH_THREADS): a small model spins on more
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model = train_irreducible(s, VALIDATION, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    untrained = build_model("mlp", MLP)
    with torch.no_grad():
        trained_loss = float(model.per_sample_loss(model.collate(VALIDATION)).mean())
        fresh_loss = float(untrained.per_sample_loss(untrained.collate(VALIDATION)).mean())
    assert trained_loss < 0.2 * fresh_loss


def test_rholoss_skips_wrong_labels_that_the_trusted_model_disagrees_with(
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    """At step 0 the model knows nothing (its losses are about equal), so the reducible loss is minus the
    irreducible one: the selected samples are those a model trained on the validation set agrees with."""
    api = make_client(make_settings(model="mlp", model_params=MLP))
    batch = CLEAN[:32] + NOISY[:32]
    assert api.post("/v1/samples", json={"samples": batch}).status_code == 202
    assert api.put("/v1/validation", json={"samples": VALIDATION}).status_code == 200
    trainer = make_trainer(reweight="rholoss")
    trainer.feed.ensure_group()
    trainer.poll()
    trainer.refresh_validation()
    rows = np.arange(trainer.table.n)
    payloads = trainer.intake.cache.get(trainer.table.ordinal[rows])
    model, rule = trainer.learner.model, trainer.learner.weighting
    with torch.no_grad():
        batch = to_device(model.collate(payloads), model.device)
        losses = model.per_sample_loss(batch).double().cpu().numpy()
    w = rule.batch_importance(trainer.table, BatchRecord(0, rows, np.full(64, 1 / 64), payloads, losses))
    assert isinstance(rule, RhoLoss) and w is not None
    chosen = [payloads[i] for i in np.flatnonzero(w > 1e-3)]
    assert len(chosen) == int(np.ceil(SELECT_FRACTION * 64))
    corrupted = [p["meta"]["corrupted"] for p in chosen if p is not None]
    assert sum(corrupted) <= 2, corrupted  # of 16 picks; about a quarter of the batch is mislabelled
    assert rule.il_version == trainer.validation.version  # trained once for this validation set
    assert IL_STEPS > 0


# ------------------------------------------------------------------ through the loop


@pytest.mark.parametrize("method", ["loss", "l2rw", "rholoss"])
def test_each_baseline_trains_through_the_loop_and_publishes_weights_averaging_one(
    method: str,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP))
    assert api.post("/v1/samples", json={"samples": CLEAN + NOISY}).status_code == 202
    assert api.put("/v1/validation", json={"samples": VALIDATION}).status_code == 200
    assert make_trainer(reweight=method, max_steps=40).run() == 0
    doc = api.get("/v1/weights").json()
    assert doc["step"] == 40 and doc["method"] == method
    assert doc["summary"]["mean"] == pytest.approx(1.0, rel=1e-3)
    assert sum(doc["sources"].values()) == pytest.approx(1.0)
