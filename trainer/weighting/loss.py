"""Loss-based heuristic (a baseline): prefer the samples the model currently gets most wrong.

Every step the loop reports the batch's per-sample training losses (before the update); each sample keeps
a running loss, and its persistent weight is proportional to it:

    L_i <- loss_i                              first visit
    L_i <- (1 - a) L_i + a loss_i              later visits (a = LOSS_EMA)
    w_i  = L_i / mean_live(L),                 unvisited samples take the mean of the visited ones

High-loss samples (hard ones, and also wrong labels, which stay hard) are drawn more often. The running
loss and the rule's own visit count live in per-row columns the rule declares, so they are compacted and
checkpointed with the rows.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from trainer.table import WeightTable
from trainer.weighting.base import BatchRecord, Weighting, normalise

LOSS_EMA = 0.5
MIN_LOSS = 1e-6  # a sample the model fits perfectly keeps a sliver of weight


class LossWeighting(Weighting):
    name: ClassVar[str] = "loss"
    needs_scores: ClassVar[bool] = False
    columns: ClassVar[dict[str, type]] = {"running": np.float32, "visits": np.uint16}  # L_i, its visits

    def observe(self, table: WeightTable, batch: BatchRecord) -> None:
        if batch.losses is None:
            return
        rows, losses = batch.rows, batch.losses
        running, visits = self.col(table, "running"), self.col(table, "visits")
        seen = visits[rows] > 0
        new = np.where(seen, (1 - LOSS_EMA) * running[rows] + LOSS_EMA * losses, losses)  # (B,)
        running[rows] = new.astype(np.float32)  # a row twice in one batch: the last update wins
        np.add.at(visits, rows[visits[rows] < np.iinfo(np.uint16).max], 1)

    def weights(self, table: WeightTable, step: int) -> np.ndarray:
        visited = table.alive & (self.col(table, "visits")[: table.n] > 0)
        if not visited.any():
            return super().weights(table, step)
        running = self.col(table, "running")[: table.n].astype(np.float64)
        prior = float(running[visited].mean())
        raw = np.maximum(np.where(visited, running, prior), MIN_LOSS)
        return normalise(raw, table.alive)
