"""The trusted set as a teacher (trainer/weighting/teacher.py): its calibration against a reference
implementation, its judgement of right and wrong targets from the first visit, its reliability gate (a
teacher that cannot tell right from wrong changes nothing), and its place in the bilevel weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tests.trainer.conftest import MLP, blobs
from trainer.models import build_model
from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.weighting.base import BatchRecord
from trainer.weighting.bilevel import Bilevel
from trainer.weighting.teacher import Teacher, derange_targets, edit_targets, fit_logistic, log_loss, roc_auc

VALIDATION = blobs(80, 21, source="val", noisy=False, prefix="v")
POOL_RIGHT = blobs(200, 22, source="a", noisy=False, prefix="r")
POOL_WRONG = [s for s in blobs(400, 23, source="b", noisy=True, prefix="w") if s["meta"]["corrupted"]][:200]


def settings(**overrides: Any) -> TrainerSettings:
    values: dict[str, Any] = {"model": "mlp", "model_params": MLP, "familiar_quantile": 0.05, **overrides}
    return TrainerSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def untrained_losses(samples: list[dict[str, Any]]) -> np.ndarray:
    """The per-sample losses of a fresh model: what the main model gives before it has learnt anything."""
    torch.manual_seed(0)
    model = build_model("mlp", MLP).eval()
    with torch.no_grad():
        return model.per_sample_loss(model.collate(samples)).double().numpy()


def test_the_calibration_is_the_class_balanced_logistic_regression_of_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1.0, 1.0, (300, 2)), rng.normal(0.5, 1.0, (100, 2))])
    y = np.concatenate([np.ones(300), np.zeros(100)])
    ours = fit_logistic(x, y, penalty=1.0)
    # scikit-learn's objective: C * sum_i cw_i logloss_i + |b|^2 / 2, intercept unpenalised
    ref = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(ours, [ref.intercept_[0], *ref.coef_[0]], rtol=1e-4, atol=1e-6)


def test_roc_auc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 5, 50).astype(float), rng.integers(1, 6, 70).astype(float)
    expected = roc_auc_score(np.r_[np.ones(50), np.zeros(70)], np.r_[pos, neg])
    assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_deranged_targets_never_keep_their_own_and_drop_unchanged_pairs() -> None:
    samples = [{"input": [float(i)], "target": i % 3} for i in range(30)]
    moved = derange_targets(samples, np.random.default_rng(2))
    assert 0 < len(moved) < 30  # some moves land on the same class and are left out
    originals = {tuple(s["input"]): s["target"] for s in samples}
    assert all(m["target"] != originals[tuple(m["input"])] for m in moved)
    assert {m["target"] for m in moved} <= {0, 1, 2}


def test_near_miss_targets_differ_from_the_right_one_in_exactly_one_character() -> None:
    samples = [{"input": f"{a}+{a}=", "target": str(2 * a)} for a in range(10, 60)] + [
        {"input": [1.0], "target": 3}
    ]
    edited = edit_targets(samples, np.random.default_rng(4))
    assert len(edited) == 50  # every text target, no class target
    for e, s in zip(edited, samples, strict=False):
        assert len(e["target"]) == len(s["target"]) and e["input"] == s["input"]
        assert sum(a != b for a, b in zip(e["target"], s["target"], strict=True)) == 1
        assert set(e["target"]) <= set("0123456789")  # characters the set's targets use


def test_a_teacher_trained_on_the_trusted_set_separates_right_from_wrong_targets_on_first_sight() -> None:
    """Before the main model has learnt anything (its losses say nothing), the reference models trained on
    80 trusted samples judge pool samples they never saw: wrong labels get a much lower P(right)."""
    teacher = Teacher(settings(), torch.device("cpu"))
    teacher.fit(VALIDATION)
    assert teacher.reference_auc > 0.9 and teacher.models  # reliable: kept
    teacher.calibrate(untrained_losses)
    assert teacher.ready and teacher.auc > 0.9
    assert teacher.uses_reference  # the main model knows nothing yet: the reference models judge
    right = teacher.judge(POOL_RIGHT, untrained_losses(POOL_RIGHT))[0]
    wrong = teacher.judge(POOL_WRONG, untrained_losses(POOL_WRONG))[0]
    assert roc_auc(right, wrong) > 0.95
    assert np.exp(right).mean() > 0.8 and np.exp(wrong).mean() < 0.2
    assert (right < 0).all() and (wrong >= -8.0).all()  # log-probabilities within the floor


def test_a_teacher_that_cannot_tell_right_from_wrong_changes_nothing() -> None:
    """Labels unrelated to the inputs: no model can learn the task from the trusted set, the reference
    models are not used, and every sample gets about the same P(right), so normalised weights do not move."""
    rng = np.random.default_rng(3)
    val = [{**s, "target": int(rng.integers(0, MLP["n_classes"]))} for s in VALIDATION]
    pool = [{**s, "target": int(rng.integers(0, MLP["n_classes"]))} for s in POOL_RIGHT]
    teacher = Teacher(settings(familiar_quantile=0), torch.device("cpu"))
    teacher.fit(val)
    assert not teacher.models  # below MIN_REFERENCE_AUC: no forward per sample for nothing
    teacher.calibrate(untrained_losses)
    p = np.exp(teacher.judge(pool, untrained_losses(pool))[0])
    assert p.max() / p.min() < 1.5


def test_the_main_models_own_losses_judge_once_it_has_learnt_the_task() -> None:
    """A main model that has learnt the task judges by itself: its loss on a sample, set against its losses
    on the trusted set's right and wrong pairs; the reference models, adding nothing, are not run."""
    teacher = Teacher(settings(), torch.device("cpu"))
    teacher.fit(VALIDATION)
    torch.manual_seed(0)
    main = build_model("mlp", MLP)
    opt = torch.optim.AdamW(main.parameters(), lr=1e-2)
    train = blobs(500, 24, source="x", noisy=False, prefix="t")
    for _ in range(100):
        opt.zero_grad()
        main.per_sample_loss(main.collate(train)).mean().backward()
        opt.step()

    def loss_of(samples: list[dict[str, Any]]) -> np.ndarray:
        return np.exp(log_loss(main, samples, torch.device("cpu"))) - 1e-7

    teacher.calibrate(loss_of)
    # the reference models add nothing to a main model that knows the task: judged without them
    assert not teacher.uses_reference and len(teacher.coef) == 2 and teacher.auc > 0.9
    right, wrong = (
        teacher.judge(POOL_RIGHT, loss_of(POOL_RIGHT))[0],
        teacher.judge(POOL_WRONG, loss_of(POOL_WRONG))[0],
    )
    assert roc_auc(right, wrong) > 0.95


def test_fitting_leaves_the_global_rng_alone_and_is_deterministic() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = Teacher(settings(), torch.device("cpu"))
    a.fit(VALIDATION)
    assert torch.equal(torch.rand(3), expected)
    b = Teacher(settings(), torch.device("cpu"))
    b.fit(VALIDATION)
    a.calibrate(untrained_losses)
    b.calibrate(untrained_losses)
    assert a.coef == b.coef and a.steps == b.steps


def test_bilevel_weights_carry_the_teachers_judgement_from_the_first_visit() -> None:
    """One step, no scores yet: the rows the teacher judged wrong already weigh less than the right ones,
    and unjudged rows of a source start at that source's mean judgement."""
    s = settings()
    rule = Bilevel(s)
    table = WeightTable()
    rule.attach(table)
    pool = POOL_RIGHT[:100] + POOL_WRONG[:100]
    # rows 200-219: more of source a's samples, not in the batch (never judged)
    table.add(np.arange(220), np.arange(220, dtype=np.uint64), ["a"] * 100 + ["b"] * 100 + ["a"] * 20)
    rule.on_validation(table, VALIDATION, 1, task_changed=False)
    rows = np.arange(200)
    batch = BatchRecord(
        0, rows, np.full(200, 1 / 200), pool, losses=untrained_losses(pool), loss_of=untrained_losses
    )
    rule.observe(table, batch)
    w = rule.weights(table, 0)
    assert w[:100].mean() > 4 * w[100:200].mean()
    assert roc_auc(w[:100], w[100:200]) > 0.95
    np.testing.assert_allclose(w[200:].mean(), w[:100].mean(), rtol=0.1)  # unjudged: the source's mean


def test_a_new_validation_set_clears_the_old_judgements() -> None:
    rule = Bilevel(settings())
    table = WeightTable()
    rule.attach(table)
    table.add(np.arange(50), np.arange(50, dtype=np.uint64), ["a"] * 50)
    rule.on_validation(table, VALIDATION, 1, task_changed=False)
    pool = POOL_RIGHT[:50]
    rule.observe(
        table,
        BatchRecord(
            0, np.arange(50), np.full(50, 0.02), pool, untrained_losses(pool), loss_of=untrained_losses
        ),
    )
    assert (rule.col(table, "teacher")[:50] < 0).all()
    rule.on_validation(table, VALIDATION[:40], 2, task_changed=True)
    assert (rule.col(table, "teacher")[:50] == 0).all()


def test_familiarity_shrinks_a_sample_by_how_far_its_loss_lies_below_unseen_items() -> None:
    """The validation samples' losses under the current model are what a new, distinct item gets: a sample
    below nearly all of them (a near-copy of learnt content) weighs less, the further below the less, and
    a sample among them keeps its full weight."""
    teacher = Teacher(settings(), torch.device("cpu"))
    teacher.fit(VALIDATION)
    teacher.calibrate(untrained_losses)
    n = len(teacher.unseen)
    x = np.log(np.sort(untrained_losses(VALIDATION)) + 1e-7)
    f = teacher.familiarity(np.array([x[0] - 5.0, x[0], x[2], x[n // 2], x[-1] + 1.0]))
    assert f[0] == pytest.approx(0.5 / (n + 1) / 0.05)  # below every unseen item: the floor
    assert f[0] < f[1] < f[2] < 1.0  # graded: the further below, the smaller
    assert f[3] == 1.0 and f[4] == 1.0  # among (or above) the unseen items: full weight
    off = Teacher(settings(familiar_quantile=0), torch.device("cpu"))
    off.fit(VALIDATION)
    off.calibrate(untrained_losses)
    assert (off.familiarity(x - 5.0) == 1).all()


def test_the_guard_softens_the_learned_weights_when_the_validation_loss_climbs_while_they_concentrate() -> (
    None
):
    rule = Bilevel(settings())
    table = WeightTable()
    rule.attach(table)
    table.add(np.arange(100), np.arange(100, dtype=np.uint64), ["a"] * 50 + ["b"] * 50)
    rule.on_validation(table, VALIDATION, 1, task_changed=False)
    pool = POOL_RIGHT[:100]
    scale = {"loss": 1.0}

    def loss_of(samples: list[dict[str, Any]]) -> np.ndarray:  # the model's losses, scaled to climb
        return untrained_losses(samples) * scale["loss"]

    def check(k: int, loss: float) -> float:
        scale["loss"] = loss
        rule.observe(
            table, BatchRecord(k, np.arange(100), np.full(100, 0.01), pool, loss_of(pool), loss_of=loss_of)
        )
        return rule.temperature

    steps = iter(range(0, 100_000, 50))

    def run(losses: list[float]) -> float:
        for loss in losses:
            check(next(steps), loss)
        return rule.temperature

    assert run([1.0]) == 1.0
    table.cols["weight"][:100] = np.r_[np.full(90, 0.01), np.full(10, 9.91)]  # concentrated: ESS ~0.1
    # one high check, however high, is noise (the guard reads the median of the last three checks), and so
    # are two among swings as large as the climb (the climb must exceed 3x the mean check-to-check change)
    quiet = [1.0] * 7
    assert run([1.0, 1.0, 1.6, *quiet, 1.8, *quiet, 1.6, 1.0, 1.6, *quiet]) == 1.0 and rule.guard_trips == 0
    assert run([1.6, 1.6]) == 0.5 and rule.guard_trips == 1  # a sustained 60% climb: softened
    assert run([1.7]) == 0.625  # the median (1.6) is not rising: recovering
    assert run([1.8]) == 0.625  # rising by 6%: held, but not another halving (the trip set the baseline 1.6)
    assert run([1.8] * 4) == 1.0  # steady: recovered step by step (x1.25)
    assert run([2.6, 2.6]) == 0.5 and rule.guard_trips == 2  # 44% above the new baseline: softened again
    table.cols["weight"][:100] = 1.0  # spread out: a climb alone is not the weights' doing
    assert run([4.0, 4.0]) == 0.625 and rule.guard_trips == 2
    assert rule.report()["guard_trips"] == 2


def test_the_guards_climb_must_exceed_the_losss_own_noise() -> None:
    """A loss that swings by 0.5 from check to check has noise ~0.5: a 30% climb of its median (0.6 on a
    best of 2.0) is inside it and does not trip the guard; the same climb of a steady loss does."""

    def trips(losses: list[float]) -> int:
        rule = Bilevel(settings())
        table = WeightTable()
        rule.attach(table)
        table.add(np.arange(100), np.arange(100, dtype=np.uint64), ["a"] * 100)
        table.cols["weight"][:100] = np.r_[np.full(90, 0.01), np.full(10, 9.91)]
        for loss in losses:
            rule._guard(table, loss)
        return rule.guard_trips

    assert trips([2.0, 2.0, 2.0, 2.6, 2.6]) == 1
    assert trips([2.0, 2.5, 2.0, 2.5, 2.0, 2.5, 2.0, 2.6, 2.6]) == 0


def test_familiarity_counts_per_source_a_redundant_source_weighs_less_its_samples_alike() -> None:
    """A flood whose samples are mostly near-copies of learnt content (f ~ 0.1) weighs less as a source;
    within a source, a familiar right answer (a recurring one) weighs the same as an unfamiliar one, so
    familiarity cannot favour a sloppy source's varied slips over its recurring right answers."""
    rule = Bilevel(settings())
    table = WeightTable()
    rule.attach(table)
    table.add(
        np.arange(300), np.arange(300, dtype=np.uint64), ["clean"] * 100 + ["flood"] * 100 + ["mixed"] * 100
    )
    rule.on_validation(table, VALIDATION, 1, task_changed=False)  # a teacher exists
    rule.col(table, "teacher")[:300] = np.log(0.9)  # every sample judged equally plausible
    rule.col(table, "familiar")[:300] = np.r_[np.ones(100), np.full(100, 0.1), np.tile([1.0, 0.1], 50)]
    table.cols["weight"][:300] = 1.0
    z = rule.teacher_logits(table)
    assert np.ptp(z[:100]) == 0 and np.ptp(z[200:]) == 0  # alike within a source
    assert z[100] < z[0] - 1.0  # the flood: well below the mix
    # sources no more redundant than the training mix (here: clean, and mixed, with half its samples
    # familiar) are not penalised; only those below it are
    assert z[0] == pytest.approx(np.log(0.9)) and z[200] == pytest.approx(np.log(0.9))
