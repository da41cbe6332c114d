"""Learning to Reweight Examples (Ren et al., 2018), a baseline: per-batch weights, no memory across steps.

For a batch, perturb each sample's loss weight, theta'(eps) = theta - alpha sum_i eps_i grad loss_i(theta),
and take the one-step look-ahead gradient of the validation loss at eps = 0:

    u_i = -d L_val(theta'(eps)) / d eps_i = alpha <grad loss_i, G_val>      G_val = grad L_val(theta)
    w_i = max(0, u_i) / sum_j max(0, u_j)                                   clamped, normalised in batch

so a sample whose gradient opposes the validation gradient gets weight 0. A batch whose scores are all
<= 0 is trained uniformly (Ren et al. would skip it). The loop computes <grad loss_i, G_val> with the
ghost scorer on every outer step and redoes the backward with these coefficients (``batch_importance``).
The persistent weights stay uniform: sampling is uniform, nothing is remembered.

Faithful to the paper, G_val is a fresh validation-batch gradient at every step: run it with
``DATADIET_VAL_GRAD_EVERY=1 DATADIET_VAL_GRAD_BETA=0`` (bench/quality.py does); the loop's defaults
average G_val over a few steps, which is a memory the paper does not have.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from trainer.table import WeightTable
from trainer.weighting.base import IMPORTANCE_FLOOR, BatchFrom, BatchRecord, Weighting


class L2RW(Weighting):
    name: ClassVar[str] = "l2rw"
    needs_scores: ClassVar[bool] = True
    batch_from: ClassVar[BatchFrom] = "scores"

    def batch_importance(self, table: WeightTable, batch: BatchRecord) -> np.ndarray | None:
        if batch.dots is None:  # no validation set yet: a plain step
            return None
        return l2rw_coef(batch.dots)


def l2rw_coef(dots: np.ndarray) -> np.ndarray:
    """w_i = max(0, <grad loss_i, G_val>) / sum_j max(0, ...) over the batch (B,); uniform if all are <= 0.
    Floored at IMPORTANCE_FLOOR and renormalised, so every coefficient is > 0 and they sum to 1."""
    u = np.maximum(np.asarray(dots, dtype=np.float64), 0.0)  # (B,)
    total = float(u.sum())
    w = u / total if total > 0 and np.isfinite(total) else np.full(len(u), 1.0 / max(len(u), 1))
    w = np.maximum(w, IMPORTANCE_FLOOR)
    return w / w.sum()
