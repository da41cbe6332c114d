"""Bilevel weighting: per-sample and per-source weights from the validation-loss hypergradient.

The outer step's score of sample i is the one-step look-ahead hypergradient of the validation loss with
respect to its weight, s_i = -lr <grad loss_i, G_val> (Learning to Reweight Examples, GREATS): a sample
whose gradient points along G_val lowers the validation loss when trained on. Summing raw s_i into logits
random-walks (shared/RESEARCH.md), so the rule is a shrunk, normalised estimate instead:

    u_i  = <grad loss_i, G_val> / (||grad loss_i|| ||G_val||)          cosine, in [-1, 1], scale-free
    c_i  = u_i - median_batch(u)                                        centred: removes the step's drift
    sig2 <- (1 - b) sig2 + b mean_batch(c^2)                            running scale of c (b = scale_beta)
    m_i  = sum_visits c_i / v_i,   r_i = v_i / (v_i + v0)               the sample's mean score, its trust
    tau2 <- running mean of (c_i - m_i,before)^2 v_i / (v_i + 1)        one visit's noise around the
                                                                        sample's own mean, from revisits
    v0   =  max(v0_min, tau2 / (sig2 - tau2))                           visits worth the prior (empirical
                                                                        Bayes); no sample term until ~200
                                                                        revisits have measured tau2
    per source s, each of its scored samples discounted by lam = 1 - 1/H once per later sample of s:
    N_s  <- lam^{n_s} N_s + n_s                                         its evidence (n_s: its samples in
    M_s  <- (lam^{n_s} N_s,old M_s + sum_{i in batch, s} c_i) / N_s     the batch), its mean score over
    S_s  =  M_s N_s / (N_s + n0)                                        ~H samples, shrunk while N_s < n0
    S-bar = sum_s mass_s S_s / sum_s mass_s                             the training mix's score (mass_s:
                                                                        the source's current weight)
    P_s  =  min(0, S_s - S-bar)                                         sources below the mix penalised
    h_i  = ramp(step) T (clip(l_src P_s(i) / sig) + clip(l_smp r_i (m_i - S_s(i)) / sig))   clip: to +-z_max
    z_i  = h_i + l_t t_i                                                t_i: the trusted-set teacher's
                                                                        log P(right target), from the
                                                                        sample's first visit, plus its
                                                                        source's familiarity penalty
                                                                        (teacher.py, teacher_logits)
    w_i  = exp(z_i) shared among a source's excess copies (base.py shared_weights), scaled so live
           weights average 1

T is the guard's temperature (1 unless the validation loss climbs 20% above its best while the weights are
concentrated; then it halves, and recovers while the loss is not rising: ``_guard``). A row the teacher
has not judged yet gets its source's mean P (its expected factor).

The source term carries most of the signal early; the per-sample deviation, shrunk toward the source by
r_i, separates good and bad samples within a source as visits accumulate. S_s averages over the last ~H of
the source's samples: a per-sample cosine has a spread (sig) far above the differences between sources, so
a short average random-walks the source weights (with H samples its noise is sig / sqrt(H)). Sources
scoring below what the model currently trains on (the weight-weighted mean of the source scores) are
penalised; none is boosted above 1 for scoring above it: the one-step look-ahead does not value
diversity, and a source of a few items repeated as near-duplicates can score above the rest and would
otherwise take most of the training. The reference is the training mix, not the typical arriving sample:
once an off-task and a spamming source are weighted down, a sloppy source must be compared with what
replaced them (on the demo stream, a reference at the batch median left the sloppy agent unpenalised).
A "source" here is a source's cohort: the samples it sent under one validation set (trainer/table.py),
so after a task change its old and new data are estimated apart (published weights sum the cohorts).
One source's copies of identical content share one weight;
the same content from different sources does not (independent agreement is evidence, not redundancy).
The per-sample term is trusted only as far as the scores are reliable: v0 compares a visit's noise (how
far a revisit lands from the sample's mean so far) with the spread between samples. On the digits
stream a visit is worth about half the prior (v0 ~ 2-5); on the arithmetic text streams one visit's
noise is ~50x the between-sample spread (v0 ~ 50), so there the weights come from the sources and stay
near uniform within a source instead of following noise. ``ramp`` rises linearly over
``warmup_steps``. Clipping the source and the sample parts separately keeps every sample within
exp(+-2 z_max) of the others (nothing collapses to zero by noise, nothing takes everything) and lets
the good samples of a heavily penalised source still rise above its bad ones.
The teacher is what the trusted set knows beyond a direction: on digits it tells right from wrong labels
at first sight (cross-fitted AUC ~0.95 from 100 images), where the one-step score needs several visits;
on the arithmetic text streams its reference models are no better than chance at 100 trusted samples and
are not used, and its judgement comes from the main model's own loss once it has learnt the task.
Knobs and defaults: trainer/settings.py (scale_beta=b, source_horizon=H, source_prior_samples=n0,
source_scale=l_src, sample_scale=l_smp, sample_prior_visits=v0_min, max_logit=z_max,
warmup_steps, teacher, teacher_scale=l_t, familiar_quantile). docs/weighting.md explains each.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.weighting.base import BatchRecord, Weighting, normalise, shared_weights
from trainer.weighting.teacher import Teacher

log = logging.getLogger("datadiet.trainer")

EPS = 1e-12
MIN_NOISE_OBS = 200  # revisits before the per-sample score's reliability counts as measured
UNKNOWN_PRIOR_VISITS = 1e6  # until then: no per-sample term, sources only
VALIDATION_CHANGE_DECAY = 0.25
TEACHER_PRIOR_ROWS = 10.0  # an unjudged row: its source's mean P(right), shrunk by this many rows
GUARD_CLIMB = 0.2  # a validation loss this far above its best counts as climbing (relative)
GUARD_CONCENTRATED = 0.5  # ... while the weights' effective sample size is below this fraction
GUARD_MIN_TEMPERATURE = 1 / 16
GUARD_RECOVER = 1.25  # the temperature's growth per check once the loss is back
GUARD_WINDOW = 3  # the guard reads the median of the last this many checks' losses: one noisy check is not
# a climb (on the demo stream a single check swings +-25% around the trend with nothing wrong)
GUARD_NOISE_Z = 3.0  # ... and a climb must also exceed this many times the checks' own noise
NOISE_BETA = 0.2  # running mean of |check-to-check change| of the loss: the noise scale


class Bilevel(Weighting):
    name: ClassVar[str] = "bilevel"
    needs_scores: ClassVar[bool] = True
    # per row: sum_visits c_i, and v_i, the visits behind it (decayed when the task changes)
    # teacher: t_i = log P(right target) from the trusted-set teacher (trainer/weighting/teacher.py), 0 while
    # not yet measured (a measured t_i is < 0)
    columns: ClassVar[dict[str, type]] = {
        "score_sum": np.float32,
        "evidence": np.uint16,
        "teacher": np.float32,
        "familiar": np.float32,  # f_i, the teacher's familiarity at the first visit; 0 while not measured
    }

    def __init__(self, settings: TrainerSettings, device: Any = None) -> None:
        super().__init__(settings, device)
        self.source_count = np.zeros(0, dtype=np.float64)  # N_s
        self.source_raw = np.zeros(0, dtype=np.float64)  # M_s
        self.sig2 = 0.0
        self.noise2 = 0.0  # the variance of one visit's score around the sample's own mean
        self.noise_obs = 0.0  # how many revisits noise2 has seen
        self.noise_batches = 0
        self.teacher = Teacher(settings, self.device) if settings.teacher else None
        self.teacher_version: int | None = None  # the validation version the teacher column was measured by
        self.teacher_state: dict[str, Any] = {}  # a resumed run's teacher calibration, until it is fitted
        self.temperature = 1.0  # the guard's factor on the learned logits (_guard)
        self.best_val_loss = math.inf  # the lowest smoothed validation loss since the guard's last trip
        self.last_val_loss = math.inf  # the smoothed validation loss at the guard's last check
        self.val_history: list[float] = []  # the last GUARD_WINDOW checks' validation losses
        self.val_noise = 0.0  # running mean |change| of the loss between consecutive checks
        self.guard_trips = 0
        self.guard_version: int | None = None

    @property
    def prior_visits(self) -> float:
        """v0: visits whose evidence equals the prior's, noise2 / (sig2 - noise2) once estimated."""
        if self.noise_obs < MIN_NOISE_OBS:
            return UNKNOWN_PRIOR_VISITS
        between = max(self.sig2 - self.noise2, 0.02 * self.sig2)
        return max(self.settings.sample_prior_visits, self.noise2 / between)

    @property
    def source_mean(self) -> np.ndarray:
        """S_s: each source's mean score, shrunk toward 0 while it has few samples."""
        n = self.source_count
        return self.source_raw * n / (n + self.settings.source_prior_samples)

    def _sources(self, n: int) -> None:
        if len(self.source_count) < n:
            pad = np.zeros(n - len(self.source_count))
            self.source_count = np.concatenate([self.source_count, pad])
            self.source_raw = np.concatenate([self.source_raw, pad])

    def observe(self, table: WeightTable, batch: BatchRecord) -> None:
        if self.teacher is not None:
            self._teach(table, batch)
        if batch.dots is None or batch.norms is None or batch.g_norm is None:
            return
        s, rows = self.settings, batch.rows
        score_sum, evidence = self.col(table, "score_sum"), self.col(table, "evidence")
        u = batch.dots / (batch.norms * batch.g_norm + EPS)  # (B,) cosine
        c = u - np.median(u)  # (B,) centred
        b = s.scale_beta
        self.sig2 = float(np.mean(c**2)) if self.sig2 == 0 else (1 - b) * self.sig2 + b * float(np.mean(c**2))
        # a revisit's deviation from the sample's mean so far: Var(c - m_prev) = noise2 (1 + 1/v)
        v_prev = evidence[rows].astype(np.float64)
        again = v_prev > 0
        if again.any():
            m_prev = score_sum[rows[again]] / v_prev[again]
            d2 = float(np.mean((c[again] - m_prev) ** 2 * v_prev[again] / (v_prev[again] + 1)))
            # a plain mean over the first 1/b batches with revisits, then the same running mean as sig2
            k = min(1.0, max(b, 1.0 / (self.noise_batches + 1)))
            self.noise2 = (1 - k) * self.noise2 + k * d2
            self.noise_batches += 1
            self.noise_obs += int(again.sum())
        # the per-sample running mean: sum of c and visits (np.add.at: a row can repeat in a batch)
        np.add.at(score_sum, rows, c.astype(np.float32))
        np.add.at(evidence, rows[evidence[rows] < np.iinfo(np.uint16).max], 1)
        # the per-source mean over its last ~H samples: N_s, M_s
        src = table.source[rows].astype(np.int64)
        self._sources(len(table.sources))
        n_s = np.bincount(src, minlength=len(self.source_count)).astype(np.float64)
        sum_s = np.bincount(src, weights=c, minlength=len(self.source_count))
        keep = (1.0 - 1.0 / s.source_horizon) ** n_s  # lam^{n_s}, 1 for sources not in the batch
        count = keep * self.source_count + n_s
        self.source_raw = np.where(
            count > 0, (keep * self.source_count * self.source_raw + sum_s) / np.maximum(count, EPS), 0.0
        )
        self.source_count = count

    def _teach(self, table: WeightTable, batch: BatchRecord) -> None:
        """Recalibrate the teacher now and then; judge the batch's rows it has not judged yet (t_i, from
        the losses the model gave them before this step trained on them: their first visit)."""
        assert self.teacher is not None
        every = self.settings.teacher_calibrate_every
        due = batch.step % every == 0
        # not calibrated yet (too few pairs, or not tried): try again every tenth of the interval, not
        # every step (a validation set that cannot make pairs would otherwise cost a calibration a step)
        retry = not self.teacher.ready and batch.step % max(1, every // 10) == 0
        if batch.loss_of is not None and (due or retry):
            self.teacher.calibrate(batch.loss_of)
            if due:
                self._guard(table, self.teacher.val_loss)
        if not self.teacher.ready or batch.losses is None:
            return
        teacher = self.col(table, "teacher")
        rows, first = np.unique(batch.rows, return_index=True)
        new = teacher[rows] == 0
        if new.any():
            idx = first[new]
            logp, familiar = self.teacher.judge([batch.payloads[i] for i in idx], batch.losses[idx])
            teacher[rows[new]] = logp
            self.col(table, "familiar")[rows[new]] = np.maximum(familiar, 1e-6)

    def _guard(self, table: WeightTable, val_loss: float) -> None:
        """A trust region on the learned (hypergradient) logits, checked at each teacher calibration with
        the model's loss on the whole validation set. One check's loss is noisy (SGD's own fluctuation:
        +-25% around the trend on the demo stream), so the guard reads a smoothed loss and asks for a climb
        beyond that noise:

            L        the median of the last GUARD_WINDOW checks' losses (so a climb must show in at least
                     two of three checks: a robust filter, not a mean that one spike moves)
            noise    the running mean of |loss_k - loss_{k-1}| between consecutive checks (NOISE_BETA)
            climbed  L > best + max(GUARD_CLIMB best, GUARD_NOISE_Z noise)   best: the lowest L since the
                                                                            last trip (or this set)
            concentrated   Kish's effective sample size of the live weights < GUARD_CONCENTRATED of them
            both     T <- max(T / 2, GUARD_MIN_TEMPERATURE); the source estimates keep half their
                     evidence (a wrong estimate is re-learnt, not reinforced); best <- L (the next halving
                     needs a further climb: a loss that rises for reasons the weights do not cause, such
                     as overfitting, cannot drive T to its floor at one level)
            otherwise, when L is no higher than at the last check: T <- min(1, T GUARD_RECOVER)

        Before GUARD_WINDOW checks, L is the lowest of those there are. The teacher's term is calibrated
        on the validation set itself and is not tempered. Kish (1965), Survey Sampling, for the ESS."""
        if not math.isfinite(val_loss):
            return
        if self.val_history:
            change = abs(val_loss - self.val_history[-1])
            first = len(self.val_history) == 1  # the first change: the running mean starts at it
            self.val_noise = change if first else (1 - NOISE_BETA) * self.val_noise + NOISE_BETA * change
        self.val_history = [*self.val_history, val_loss][-GUARD_WINDOW:]
        ordered = sorted(self.val_history)
        smoothed = ordered[len(ordered) // 2] if len(ordered) == GUARD_WINDOW else ordered[0]
        previous, self.last_val_loss = self.last_val_loss, smoothed
        self.best_val_loss = min(self.best_val_loss, smoothed)
        w = table.weight[table.alive].astype(np.float64)
        ess = float(w.sum() ** 2 / max(len(w) * float((w**2).sum()), EPS)) if len(w) else 1.0
        margin = max(GUARD_CLIMB * self.best_val_loss, GUARD_NOISE_Z * self.val_noise)
        climbed = smoothed > self.best_val_loss + margin
        if climbed and ess < GUARD_CONCENTRATED and self.temperature > GUARD_MIN_TEMPERATURE:
            self.temperature = max(GUARD_MIN_TEMPERATURE, self.temperature / 2)
            self.source_count *= 0.5
            self.guard_trips += 1
            log.warning(
                "validation loss %.4f (median of the last %d checks) is %.0f%% above its best (%.4f), beyond "
                "its noise (%.4f), while the weights are concentrated (effective sample size %.2f of the "
                "samples): softening the learned weights (temperature %.3f)",
                smoothed,
                len(self.val_history),
                100 * (smoothed / self.best_val_loss - 1),
                self.best_val_loss,
                self.val_noise,
                ess,
                self.temperature,
            )
            self.best_val_loss = smoothed
        elif smoothed <= previous:
            self.temperature = min(1.0, self.temperature * GUARD_RECOVER)

    def teacher_logits(self, table: WeightTable) -> np.ndarray:
        """The teacher's part of every row's logit, 0 everywhere without a teacher:

            t_i                        log P(right target), measured at the first visit; for a row not
                                       judged yet, the log of its source's mean P over the judged rows
                                       (shrunk toward the mean over all sources by TEACHER_PRIOR_ROWS
                                       rows: the row's expected factor)
            F_s = mean f over s's judged rows (shrunk the same way)     its familiarity: how much of what
                                                                        the source sends is near-copies
                                                                        of content already learnt
            + min(0, log F_s - sum_s mass_s log F_s / sum_s mass_s)     a source more redundant than the
                                                                        training mix (mass_s: its weight)

        Familiarity counts per source, not per sample: a correct answer that recurs is familiar and a
        wrong one that varies is not, so per sample it would favour a sloppy source's slips over its
        right answers (as the old copy rule did, base.py shared_weights); a flood's near-copies are
        familiar as a whole."""
        t = self.col(table, "teacher")[: table.n].astype(np.float64)
        known = t < 0
        if self.teacher is None or not known.any():
            return np.zeros(table.n)
        src = table.source.astype(np.int64)
        n_src = len(table.sources)
        count = np.bincount(src[known], minlength=n_src) + TEACHER_PRIOR_ROWS

        def source_mean(x: np.ndarray) -> np.ndarray:  # per source, shrunk toward the mean over all
            total = np.bincount(src[known], weights=x, minlength=n_src)
            return (total + TEACHER_PRIOR_ROWS * float(x.mean())) / count

        p = np.exp(t[known])
        out = np.where(known, t, np.log(source_mean(p))[src])
        log_f = np.log(source_mean(self.col(table, "familiar")[: table.n][known].astype(np.float64)))
        alive = table.alive
        mass = np.bincount(src[alive], weights=table.weight[alive], minlength=n_src)
        reference = float(mass @ log_f / max(mass.sum(), EPS))
        return out + np.minimum(0.0, log_f - reference)[src]

    def logits(self, table: WeightTable, step: int) -> np.ndarray:
        """z_i for every row (see the module docstring)."""
        s = self.settings
        self._sources(len(table.sources))
        sig = np.sqrt(self.sig2) + EPS
        visits = self.col(table, "evidence")[: table.n].astype(np.float64)
        score_sum = self.col(table, "score_sum")[: table.n]
        mean = np.divide(score_sum, np.maximum(visits, 1.0), dtype=np.float64)  # m_i
        trust = visits / (visits + self.prior_visits)  # r_i
        src = table.source.astype(np.int64)
        source = self.source_mean  # S_s
        alive = table.alive
        mass = np.bincount(src[alive], weights=table.weight[alive], minlength=len(source))  # (n_sources,)
        reference = float(mass @ source / max(mass.sum(), EPS))  # S-bar: what the model trains on now
        penalty = np.minimum(source - reference, 0.0)  # P_s
        z_src = np.clip(s.source_scale * penalty / sig, -s.max_logit, s.max_logit)  # (n_sources,)
        z_smp = np.clip(s.sample_scale * trust * (mean - source[src]) / sig, -s.max_logit, s.max_logit)
        ramp = min(1.0, step / s.warmup_steps) if s.warmup_steps else 1.0
        return ramp * self.temperature * (z_src[src] + z_smp) + s.teacher_scale * self.teacher_logits(table)

    def weights(self, table: WeightTable, step: int) -> np.ndarray:
        if self.sig2 == 0 and not (self.col(table, "teacher")[: table.n] < 0).any():
            return super().weights(table, step)
        z = self.logits(table, step)
        mode = self.settings.share_copies
        if mode == "none":
            return normalise(np.where(table.alive, np.exp(z), 0.0), table.alive)
        return normalise(shared_weights(table, z, natural=mode == "excess"), table.alive)

    def on_validation(
        self, table: WeightTable, samples: Sequence[dict[str, Any]], version: int, *, task_changed: bool
    ) -> None:
        """Old evidence fades when the task changes, so new scores must dominate quickly; the teacher is
        trained on the new set (and again on a resumed run: it is deterministic given the set and the seed,
        so the column it measured stays valid)."""
        if self.teacher is not None:
            same = version == self.teacher_version
            if not same:  # judged by another set's teacher: judge again
                self.col(table, "teacher")[: table.n] = 0
                self.col(table, "familiar")[: table.n] = 0
                self.teacher_version = version
            self.teacher.fit(samples, self.heartbeat)
            if same and self.teacher_state:  # a resumed run: the calibration it had at that step
                self.teacher.load_state(self.teacher_state)
            self.teacher_state = {}
        if version != self.guard_version:
            self.best_val_loss, self.temperature, self.guard_version = math.inf, 1.0, version
            self.last_val_loss, self.val_history, self.val_noise = math.inf, [], 0.0
        if not task_changed:
            return
        n = table.n
        self.col(table, "score_sum")[:n] *= VALIDATION_CHANGE_DECAY
        evidence = self.col(table, "evidence")
        evidence[:n] = (evidence[:n] * VALIDATION_CHANGE_DECAY).astype(np.uint16)
        self.source_count *= VALIDATION_CHANGE_DECAY  # S_s shrinks toward 0 until new scores come in

    def state(self) -> dict[str, Any]:
        return {
            "source_count": self.source_count.tolist(),
            "source_raw": self.source_raw.tolist(),
            "sig2": self.sig2,
            "noise2": self.noise2,
            "noise_obs": self.noise_obs,
            "noise_batches": self.noise_batches,
            "teacher_version": self.teacher_version,
            "teacher": self.teacher.state() if self.teacher is not None else {},
            "guard": {
                "temperature": self.temperature,
                "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
                "last_val_loss": None if math.isinf(self.last_val_loss) else self.last_val_loss,
                "trips": self.guard_trips,
                "version": self.guard_version,
                "history": list(self.val_history),
                "noise": self.val_noise,
            },
        }

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": round(self.temperature, 4), "guard_trips": self.guard_trips}
        if self.teacher is not None:
            out["teacher"] = self.teacher.report()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        self.source_count = np.asarray(state.get("source_count", []), dtype=np.float64)
        self.source_raw = np.asarray(state.get("source_raw", []), dtype=np.float64)
        n = max(len(self.source_count), len(self.source_raw))
        self.source_count = np.pad(self.source_count, (0, n - len(self.source_count)))
        self.source_raw = np.pad(self.source_raw, (0, n - len(self.source_raw)))
        self.sig2 = float(state.get("sig2", 0.0))
        self.noise2 = float(state.get("noise2", 0.0))
        self.noise_obs = float(state.get("noise_obs", 0.0))
        self.noise_batches = int(state.get("noise_batches", 0))
        version = state.get("teacher_version")
        self.teacher_version = None if version is None else int(version)
        self.teacher_state = dict(state.get("teacher", {}))  # applied once the teacher is fitted again
        guard = state.get("guard", {})
        self.temperature = float(guard.get("temperature", 1.0))
        best = guard.get("best_val_loss")
        self.best_val_loss = math.inf if best is None else float(best)
        last = guard.get("last_val_loss")
        self.last_val_loss = math.inf if last is None else float(last)
        self.guard_trips = int(guard.get("trips", 0))
        self.val_history = [float(x) for x in guard.get("history", [])][-GUARD_WINDOW:]
        self.val_noise = float(guard.get("noise", 0.0))
        self.guard_version = guard.get("version")
