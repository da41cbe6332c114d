"""The trusted set as a teacher: a per-sample probability that a sample's target is right, from its first
visit, with the teacher's own reliability measured on the trusted set itself.

The one-step hypergradient score needs many visits per sample before it separates good from bad samples
(one visit's noise is up to ~50x the spread between samples on the text streams, trainer/weighting/
bilevel.py), and on a stream that outruns the trainer most samples are visited once. Two models judge a
sample from one forward pass each: a model trained on the validation set alone (RHO-LOSS's
irreducible-loss model, Mindermann et al. 2022), and the main model itself, which has never trained on the
validation samples. A target the trusted data makes unlikely has a high loss under them. How far each
loss can be trusted depends on the task, on the set's size and on how far the main model has come, so it
is measured on the set itself:

    folds F_1, F_2       a seeded random halving of the validation set V
    theta_k              a fresh model of the trainer's kind, trained on V minus F_k (AdamW, mean loss) and
                         stopped at its lowest loss on F_k (checked every ``EVAL_EVERY`` steps)
    right / wrong pairs  each F_k as it is (y = 1); wrong (y = 0): F_k with targets moved to other samples
                         of F_k (a derangement; pairs whose target did not change are left out), and, for
                         text targets, F_k with one character of the target replaced (a near miss)
    x_ref   = log(loss + 1e-7) under theta_k, for a pair in F_k; for a stream sample, the mean over k
    x_model = log(loss + 1e-7) under the current model (for a stream sample: at its first visit, before
              the step trains on it)
    LLR = a + b_ref x_ref + b_model x_model     logistic regression of y on the pairs' features (Platt
                                                scaling, Platt 1999; class-balanced, an L2 penalty on b),
                                                refitted every 50 steps as the model changes: the
                                                log-likelihood ratio of "right target" over "wrong"
    t_i = log sigma(LLR_i)                      and f_i: ``familiarity`` (near-copies of learnt content,
                                                used per source: trainer/weighting/bilevel.py)

so a sample's weight picks up the factor P(right target | its losses): ~1 for a sample the
teacher finds plausible, small for one it finds implausible, and the same for every sample (no effect
after normalisation) when neither model can tell right from wrong on the validation pairs (b ~ 0). The
reference models are kept only when their own cross-fitted AUC reaches 0.6 (on the text tasks at 100
trusted samples they reach ~0.55 and would cost two forwards per sample for nothing). This is the
clean-probability weighting of noisy-label learning (DivideMix, Li et al. 2020, fits it with a
two-component mixture on the training loss; here the two loss distributions are measured on trusted data
instead of assumed). ``auc`` (the calibrated LLR's ROC AUC on the pairs) is the teacher's reliability,
published in the trainer status (``/v1/stats`` trainer.weighting.teacher).

What it cannot see: a wrong target the trusted data also makes likely (a plausible slip), and a target
that is right but far from the trusted set's distribution (it is taken for wrong: the validation set must
represent the task). Off-task samples usually have high loss under both models and are weighted down.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from trainer.models import TrainModel, build_model
from trainer.models.base import to_device
from trainer.settings import TrainerSettings

log = logging.getLogger("datadiet.trainer")

MIN_SAMPLES = 16  # a smaller validation set gives no teacher (both halves must train and calibrate)
EVAL_EVERY = 20  # steps between held-out checks while a fold model trains
PATIENCE = 3  # held-out checks without improvement before a fold model stops
LOSS_FLOOR = 1e-7  # x = log(loss + LOSS_FLOOR): a loss of 0 stays finite (float32's resolution near 1)
SLOPE_PENALTY = 1.0  # L2 penalty on the calibration slope b (x is in log-loss units, ~1)
MIN_REFERENCE_AUC = 0.6  # reference models below this cross-fitted AUC are not used
REFERENCE_GAIN = 0.01  # the AUC the reference models must add to the main model's alone to be used
MIN_LOG_PROB = -8.0  # t_i is floored here: no sample weighs less than e^-8 of a plausible one for this


class Teacher:
    """The trusted set's judge of targets (see the module docstring): cross-fitted reference models, the
    validation set's right and wrong pairs, and a calibration refreshed against the current model.
    ``fit`` trains the reference models; ``calibrate`` refits the LLR with the current model's losses;
    ``judge`` gives t_i for a batch."""

    def __init__(self, settings: TrainerSettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.models: list[TrainModel] = []  # the fold models, kept only while reliable (MIN_REFERENCE_AUC)
        self.right: list[dict[str, Any]] = []  # the validation samples, fold by fold
        self.wrong: list[dict[str, Any]] = []  # the same with deranged targets
        self.ref_right = np.empty(0)  # x under the fold model that did not see the sample, (len(right),)
        self.ref_wrong = np.empty(0)  # (len(wrong),)
        self.reference_auc = math.nan  # the reference models' own cross-fitted AUC
        self.coef: list[float] = []  # LLR = coef . [1, x_reference?, x_model]; [] until calibrated
        self.auc = math.nan  # the calibrated LLR's AUC on the validation pairs (0.5: no better than chance)
        self.steps: list[int] = []  # the steps each fold model stopped at
        self.val_loss = math.nan  # the current model's mean loss on the validation set, at calibration
        self.unseen = np.empty(0)  # sorted x_model of the validation samples: unseen distinct items' losses

    @property
    def ready(self) -> bool:
        return bool(self.coef)

    def fit(self, samples: Sequence[dict[str, Any]], heartbeat: Callable[[], None] = lambda: None) -> None:
        """Train the two fold models on ``samples`` (the validation set) and build its right and wrong
        pairs. ``heartbeat`` is called every ``EVAL_EVERY`` steps (the trainer renews its lease there).
        With fewer than ``MIN_SAMPLES`` samples, or targets that cannot be moved between samples, there is
        no teacher. The reference models are kept only if their cross-fitted AUC reaches
        ``MIN_REFERENCE_AUC`` (below it they cost a forward per sample for nothing). The global torch RNG is
        left as it was. Calibration (``calibrate``) is still to come."""
        self.__init__(self.settings, self.device)  # type: ignore[misc]
        samples = list(samples)
        if len(samples) < MIN_SAMPLES:
            log.info("teacher: %d validation samples, fewer than %d: no teacher", len(samples), MIN_SAMPLES)
            return
        rng = np.random.default_rng([self.settings.seed, 2])
        order = rng.permutation(len(samples))
        folds = [order[: len(order) // 2], order[len(order) // 2 :]]
        models, right, wrong, x_right, x_wrong = [], [], [], [], []
        for k, held in enumerate(folds):
            train = [samples[i] for i in folds[1 - k]]
            heldout = [samples[i] for i in held]
            model, step = train_reference(
                self.settings, train, self.device, seed=k + 2, heldout=heldout, heartbeat=heartbeat
            )
            models.append(model)
            self.steps.append(step)
            moved = derange_targets(heldout, rng) + edit_targets(heldout, rng)
            right += heldout
            wrong += moved
            x_right.append(log_loss(model, heldout, self.device))
            x_wrong.append(log_loss(model, moved, self.device) if moved else np.empty(0))
        if not wrong:  # every target alike: no wrong pair can be made, nothing to learn
            log.info("teacher: the validation targets are all alike: no teacher")
            return
        self.right, self.wrong = right, wrong
        self.ref_right, self.ref_wrong = np.concatenate(x_right), np.concatenate(x_wrong)
        self.reference_auc = roc_auc(-self.ref_right, -self.ref_wrong)
        self.models = models if self.reference_auc >= MIN_REFERENCE_AUC else []
        log.info(
            "teacher: reference models trained on the validation set's halves (%d, %d steps); right-vs-"
            "wrong target AUC %.3f (%s)",
            *self.steps,
            self.reference_auc,
            "used" if self.models else f"below {MIN_REFERENCE_AUC}: not used",
        )

    def calibrate(self, loss_of: Callable[[Sequence[dict[str, Any]]], np.ndarray]) -> None:
        """Refit LLR = coef . [1, x_reference?, x_model] on the validation pairs, x_model = log(loss + floor)
        under the current model (``loss_of``: its per-sample losses, (n,)). x_reference is included only
        while it adds at least ``REFERENCE_GAIN`` to the AUC of x_model alone: early, when the main model
        knows little, the reference models carry the judgement; once it has learnt the task they add
        little, and judging without them saves two forwards per new sample. A no-op before ``fit`` built
        the pairs."""
        if not self.wrong:
            return
        right_loss = loss_of(self.right)
        self.val_loss = float(np.mean(right_loss))
        x_right = np.log(right_loss + LOSS_FLOOR)
        self.unseen = np.sort(x_right)
        x_wrong = np.log(loss_of(self.wrong) + LOSS_FLOOR)
        y = np.concatenate([np.ones(len(x_right)), np.zeros(len(x_wrong))])
        x_model = np.concatenate([x_right, x_wrong])[:, None]  # (n, 1)
        self.coef, self.auc = _fit(x_model, y)
        if self.models:
            x_both = np.concatenate([np.concatenate([self.ref_right, self.ref_wrong])[:, None], x_model], 1)
            coef, auc = _fit(x_both, y)
            if auc >= self.auc + REFERENCE_GAIN:
                self.coef, self.auc = coef, auc

    @property
    def uses_reference(self) -> bool:
        """Whether the current calibration judges with the reference models (three coefficients)."""
        return len(self.coef) == 3

    @torch.no_grad()
    def judge(self, payloads: Sequence[dict[str, Any]], losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(t_i = log P(right target | the losses) in [MIN_LOG_PROB, 0), f_i = ``familiarity``), each (B,),
        for samples the current model gave ``losses`` (B,) before training on them. Raises RuntimeError
        before ``calibrate``."""
        if not self.coef:
            raise RuntimeError("the teacher is not calibrated")
        x_model = np.log(np.asarray(losses, dtype=np.float64) + LOSS_FLOOR)
        cols = [x_model]
        if self.uses_reference:
            cols.insert(0, np.mean([log_loss(m, payloads, self.device) for m in self.models], axis=0))
        llr = self.coef[0] + np.stack(cols, 1) @ np.asarray(self.coef[1:])
        logp = -np.logaddexp(0.0, -llr)  # log sigma(llr)
        return np.clip(logp, MIN_LOG_PROB, -1e-6), self.familiarity(x_model)

    def familiarity(self, x_model: np.ndarray) -> np.ndarray:
        """f_i in (0, 1], (B,): how far a sample is from being a near-copy of something already learnt.

            q_i = (#{unseen validation items with x < x_i, ties half} + 1/2) / (n_val + 1)
                                        (the sample's place among the losses of distinct unseen items)
            f_i = min(1, q_i / familiar_quantile)

        The model has never trained on the validation samples, so their losses are what a new, distinct
        item of the task gets now. A sample whose loss at first sight is below nearly all of theirs is one
        the model has, in effect, already seen: a copy or near-copy of trained content (at whatever noise
        level: the closer the copy, the lower its loss) or content learnt so well that it adds little
        (RHO-LOSS skips such points too). Its weight shrinks with how far below it lies, down to
        1 / (2 (n_val + 1) familiar_quantile). ``familiar_quantile`` = 0 turns this off."""
        qf = self.settings.familiar_quantile
        if qf <= 0 or not len(self.unseen):
            return np.ones(len(x_model))
        below = np.searchsorted(self.unseen, x_model, side="left")  # ties count half (mid-rank)
        q = ((below + np.searchsorted(self.unseen, x_model, side="right")) / 2 + 0.5) / (len(self.unseen) + 1)
        return np.minimum(1.0, q / qf)

    def state(self) -> dict[str, Any]:
        """The calibration (saved with the trainer state: the reference models are retrained on resume,
        deterministically, but the calibration belongs to the step it was made at)."""
        return {
            "coef": self.coef,
            "auc": None if math.isnan(self.auc) else self.auc,
            "unseen": self.unseen.tolist(),
            "val_loss": None if math.isnan(self.val_loss) else self.val_loss,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        coef = [float(c) for c in state.get("coef", [])]
        if len(coef) == 2 or (len(coef) == 3 and self.models):  # features the fitted teacher has
            self.coef = coef
            auc = state.get("auc")
            self.auc = math.nan if auc is None else float(auc)
            self.unseen = np.asarray(state.get("unseen", []), dtype=np.float64)
            val = state.get("val_loss")
            self.val_loss = math.nan if val is None else float(val)

    def report(self) -> dict[str, Any]:
        """For the trainer status."""
        return {
            "calibrated": self.ready,
            "auc": None if math.isnan(self.auc) else round(self.auc, 4),
            "reference_auc": None if math.isnan(self.reference_auc) else round(self.reference_auc, 4),
            "reference_used": self.uses_reference,
        }


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[list[float], float]:
    """The calibration on features x (n, k) of pairs y (n,): its coefficients and its AUC."""
    coef = fit_logistic(x, y, SLOPE_PENALTY)
    llr = coef[0] + x @ np.asarray(coef[1:])
    return coef, roc_auc(llr[y == 1], llr[y == 0])


def train_reference(
    settings: TrainerSettings,
    samples: Sequence[dict[str, Any]],
    device: torch.device,
    *,
    seed: int = 1,
    steps: int = 300,
    heldout: Sequence[dict[str, Any]] | None = None,
    heartbeat: Callable[[], None] = lambda: None,
) -> tuple[TrainModel, int]:
    """A fresh model of the trainer's kind and config trained on ``samples`` for up to ``steps`` AdamW
    steps of mean loss on batches drawn with replacement (the trainer's lr, weight decay and clipping).
    With ``heldout``, the model is checked on it every ``EVAL_EVERY`` steps and the lowest-loss state is
    returned (early stopping, ``PATIENCE`` checks). Returns (model in eval mode, the step it stopped at).
    Initialisation and batches come from ``settings.seed`` and ``seed``; the global torch RNG is left as
    it was, so the main run does not depend on whether a reference model was trained."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + seed)
        model = build_model(settings.model, settings.model_params).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng([settings.seed, seed])
    k = min(settings.batch_size, len(samples))
    best, best_state, best_step, since = math.inf, None, steps, 0
    model.train()
    for step in range(1, steps + 1):
        idx = rng.integers(len(samples), size=k)
        batch = to_device(model.collate([samples[i] for i in idx]), device)
        model.per_sample_loss(batch).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % EVAL_EVERY and step != steps:
            continue
        heartbeat()
        if heldout is None:
            continue
        loss = float(np.mean(np.exp(log_loss(model, heldout, device)) - LOSS_FLOOR))
        model.train()
        if loss < best:
            best, best_state, best_step, since = loss, copy.deepcopy(model.state_dict()), step, 0
        else:
            since += 1
            if since >= PATIENCE:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_step = steps
    return model.eval(), best_step


@torch.no_grad()
def log_loss(model: TrainModel, samples: Sequence[dict[str, Any]], device: torch.device) -> np.ndarray:
    """log(loss_i + LOSS_FLOOR) under ``model`` (eval mode), (n,), in batches of 256."""
    model.eval()
    out = []
    for i in range(0, len(samples), 256):
        batch = to_device(model.collate(list(samples[i : i + 256])), device)
        out.append(model.per_sample_loss(batch).double().cpu().numpy())
    return np.log(np.concatenate(out) + LOSS_FLOOR) if out else np.empty(0)


def derange_targets(samples: Sequence[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Each sample with another sample's target (a random cyclic shift of a random order, so no sample
    keeps its own), leaving out those whose new target equals the old (same class, same answer)."""
    n = len(samples)
    if n < 2:
        return []
    order = rng.permutation(n)
    moved = np.empty(n, dtype=np.int64)
    moved[order] = np.roll(order, 1)  # sample order[j] takes the target of order[j - 1]
    out = []
    for i in range(n):
        target = samples[moved[i]]["target"]
        if target != samples[i]["target"]:
            out.append({**samples[i], "target": target})
    return out


def edit_targets(samples: Sequence[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Each sample whose target is a string, with one character of it replaced by another character
    that occurs in the set's targets: a near miss (a slip in one digit, one wrong letter of an argument),
    the kind of wrong target another sample's whole target does not stand for. Class targets are left to
    ``derange_targets``."""
    alphabet = sorted({c for s in samples if isinstance(s["target"], str) for c in s["target"]})
    out = []
    for s in samples:
        target = s["target"]
        if not isinstance(target, str) or not target or len(alphabet) < 2:
            continue
        i = int(rng.integers(len(target)))
        others = [c for c in alphabet if c != target[i]]
        out.append({**s, "target": target[:i] + others[int(rng.integers(len(others)))] + target[i + 1 :]})
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, penalty: float, iters: int = 50) -> list[float]:
    """[a, b_1..b_k] maximising sum_i log sigma((2 y_i - 1)(a + b . x_i)) - penalty |b|^2 / 2 with the
    classes weighted equally (each class's terms scaled to half the total), by Newton's method.
    x: (n,) or (n, k); y: (n,) in {0, 1}."""
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=np.float64)
    n1, n0 = y.sum(), len(y) - y.sum()
    cw = np.where(y == 1, 0.5 / max(n1, 1), 0.5 / max(n0, 1)) * len(y)  # balanced class weights
    X = np.concatenate([np.ones((len(x), 1)), x], axis=1)  # (n, k + 1)
    theta = np.zeros(X.shape[1])
    reg = np.diag([0.0] + [penalty] * x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ theta)))
        grad = X.T @ (cw * (p - y)) + reg @ theta
        hess = (X * (cw * p * (1 - p))[:, None]).T @ X + reg + 1e-9 * np.eye(len(theta))
        delta = np.linalg.solve(hess, grad)
        theta -= delta
        if np.abs(delta).max() < 1e-8:
            break
    return [float(t) for t in theta]


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U statistic / n1 n0)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        return math.nan
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))
