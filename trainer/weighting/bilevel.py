"""Bilevel weighting: per-sample and per-source weights from the validation-loss hypergradient.

The outer step's score of sample i is the one-step look-ahead hypergradient of the validation loss with
respect to its weight, s_i = -lr <grad loss_i, G_val> (Learning to Reweight Examples, GREATS): a sample
whose gradient points along G_val lowers the validation loss when trained on. Summing raw s_i into logits
random-walks (shared/RESEARCH.md), so the rule is a shrunk, normalised estimate instead:

    u_i  = <grad loss_i, G_val> / (||grad loss_i|| ||G_val||)          cosine, in [-1, 1], scale-free
    c_i  = u_i - median_batch(u)                                        centred: removes the step's drift
    sig2 <- (1 - b) sig2 + b mean_batch(c^2)                            running scale of c (b = source_beta)
    m_i  = sum_visits c_i / v_i,   r_i = v_i / (v_i + v0)               the sample's mean score, its trust
    S_s  <- (1 - a_s) S_s + a_s mean_{i in batch, s} c_i,  a_s = 1 - (1 - source_beta)^{n_s}
    z_i  = ramp(step) clip((l_src S_s(i) + l_smp r_i (m_i - S_s(i))) / sig, -z_max, z_max)
    w_i  = exp(z_i) / |group(i)|,  then scaled so live weights average 1

The source term S (a slow running mean, DoReMi-like) carries most of the signal early; the per-sample
deviation, shrunk toward the source by r_i, separates good and bad samples within a source as visits
accumulate. Identical content (one group) shares one weight among its copies. ``ramp`` rises linearly
over ``warmup_steps``; clipping the logit keeps every source and sample above exp(-z_max) of the others
(nothing collapses to zero by noise) and below exp(z_max) (nothing takes everything).
Knobs and defaults: trainer/settings.py (source_beta, source_scale=l_src, sample_scale=l_smp,
sample_prior_visits=v0, max_logit=z_max, warmup_steps).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.weighting.base import Weighting, normalise, shared_weights

EPS = 1e-12
VALIDATION_CHANGE_DECAY = 0.25


class Bilevel(Weighting):
    name: ClassVar[str] = "bilevel"
    scores: ClassVar[bool] = True

    def __init__(self, settings: TrainerSettings) -> None:
        super().__init__(settings)
        self.source_mean = np.zeros(0, dtype=np.float64)  # S_s
        self.sig2 = 0.0

    def _sources(self, n: int) -> None:
        if len(self.source_mean) < n:
            self.source_mean = np.concatenate([self.source_mean, np.zeros(n - len(self.source_mean))])

    def observe(
        self,
        table: WeightTable,
        rows: np.ndarray,
        dots: np.ndarray,
        norms: np.ndarray,
        g_norm: float,
        step: int,
    ) -> None:
        u = dots / (norms * g_norm + EPS)  # (B,) cosine
        c = u - np.median(u)  # (B,) centred
        b = self.settings.source_beta
        self.sig2 = float(np.mean(c**2)) if self.sig2 == 0 else (1 - b) * self.sig2 + b * float(np.mean(c**2))
        # the per-sample running mean: sum of c and visits (np.add.at: a row can repeat in a batch)
        np.add.at(table.cols["score_sum"], rows, c.astype(np.float32))
        v = table.cols["visits"]
        np.add.at(v, rows[v[rows] < np.iinfo(np.uint16).max], 1)
        # the per-source running mean, one EMA update per sample of that source in the batch
        src = table.source[rows].astype(np.int64)
        self._sources(len(table.sources))
        n_s = np.bincount(src, minlength=len(self.source_mean))
        sum_s = np.bincount(src, weights=c, minlength=len(self.source_mean))
        seen = n_s > 0
        a = 1 - (1 - b) ** n_s[seen]
        self.source_mean[seen] = (1 - a) * self.source_mean[seen] + a * sum_s[seen] / n_s[seen]

    def logits(self, table: WeightTable, step: int) -> np.ndarray:
        """z_i for every row (see the module docstring)."""
        s = self.settings
        self._sources(len(table.sources))
        sig = np.sqrt(self.sig2) + EPS
        visits = table.visits.astype(np.float64)
        mean = np.divide(table.score_sum, np.maximum(visits, 1.0), dtype=np.float64)  # m_i
        trust = visits / (visits + s.sample_prior_visits)  # r_i
        src_term = self.source_mean[table.source.astype(np.int64)]  # S_s(i)
        z = (s.source_scale * src_term + s.sample_scale * trust * (mean - src_term)) / sig
        ramp = min(1.0, step / s.warmup_steps) if s.warmup_steps else 1.0
        return ramp * np.clip(z, -s.max_logit, s.max_logit)

    def weights(self, table: WeightTable, step: int) -> np.ndarray:
        if self.sig2 == 0:
            return super().weights(table, step)
        return normalise(shared_weights(table, self.logits(table, step)), table.alive)

    def on_validation_change(self, table: WeightTable) -> None:
        """Old evidence fades: the task may have changed, so new scores must dominate quickly."""
        table.cols["score_sum"][: table.n] *= VALIDATION_CHANGE_DECAY
        table.cols["visits"][: table.n] = (table.visits * VALIDATION_CHANGE_DECAY).astype(np.uint16)
        self.source_mean *= VALIDATION_CHANGE_DECAY

    def state(self) -> dict[str, Any]:
        return {"source_mean": self.source_mean.tolist(), "sig2": self.sig2}

    def load_state(self, state: dict[str, Any]) -> None:
        self.source_mean = np.asarray(state.get("source_mean", []), dtype=np.float64)
        self.sig2 = float(state.get("sig2", 0.0))
