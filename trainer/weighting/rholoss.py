"""RHO-LOSS-style selection (Mindermann et al., 2022), a baseline: train on the points whose loss is
reducible, i.e. high under the current model but low under a model trained on trusted data.

    IL_i  = loss_i(theta_IL)              irreducible loss: a copy of the model kind trained on the
                                          validation set alone (IL_STEPS steps, when it first appears and
                                          again whenever it is replaced)
    RL_i  = loss_i(theta) - IL_i          reducible loss; loss_i(theta) is the step's own forward
    keep the top ceil(SELECT_FRACTION * B) of the batch by RL_i, each with coefficient 1/k; the rest get
    a floor (``batch_importance``: the loop asks before its backward, so the step has one)

Wrong labels have a high training loss but also a high irreducible loss (the trusted model disagrees with
them too), so they are skipped; points already learnt have a low training loss and are skipped too. The
paper selects 10% of a 10x larger batch; here every method takes the same batch and step budget, so the
rule selects within the batch. The persistent weights stay uniform (sampling is uniform).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from trainer.models import TrainModel
from trainer.models.base import to_device
from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.weighting.base import IMPORTANCE_FLOOR, BatchFrom, BatchRecord, Weighting
from trainer.weighting.teacher import train_reference

SELECT_FRACTION = 0.25
IL_STEPS = 300


class RhoLoss(Weighting):
    name: ClassVar[str] = "rholoss"
    needs_scores: ClassVar[bool] = False
    batch_from: ClassVar[BatchFrom] = "losses"

    def __init__(self, settings: TrainerSettings, device: torch.device | None = None) -> None:
        super().__init__(settings, device)
        self.validation: list[dict[str, Any]] = []
        self.il_model: TrainModel | None = None
        self.il_version: int | None = None  # the validation version the IL model was trained on
        self.version: int | None = None

    def on_validation(
        self, table: WeightTable, samples: Sequence[dict[str, Any]], version: int, *, task_changed: bool
    ) -> None:
        self.validation, self.version = list(samples), version  # the IL model is trained when first needed

    def batch_importance(self, table: WeightTable, batch: BatchRecord) -> np.ndarray | None:
        if not self.validation or batch.losses is None:  # nothing trusted yet: a plain step
            return None
        if self.il_model is None or self.il_version != self.version:
            self.il_model = train_irreducible(self.settings, self.validation, self.device, self.heartbeat)
            self.il_version = self.version
        il = per_sample_loss(self.il_model, batch.payloads, self.device)  # (B,)
        return select_top(batch.losses - il, SELECT_FRACTION)


def select_top(reducible: np.ndarray, fraction: float) -> np.ndarray:
    """Coefficients (B,) summing to 1: 1/k on the k = ceil(fraction * B) highest ``reducible``, a floor
    elsewhere."""
    b = len(reducible)
    k = max(1, min(b, math.ceil(fraction * b)))
    top = np.argsort(-np.asarray(reducible, dtype=np.float64), kind="stable")[:k]
    w = np.full(b, IMPORTANCE_FLOOR)
    w[top] = 1.0 / k
    return w / w.sum()


@torch.no_grad()
def per_sample_loss(model: TrainModel, samples: Sequence[Any], device: torch.device) -> np.ndarray:
    """loss_i under ``model`` for Sample dicts, (B,), without gradients."""
    model.eval()
    batch = to_device(model.collate(samples), device)
    return model.per_sample_loss(batch).double().cpu().numpy()


def train_irreducible(
    settings: TrainerSettings, samples: list[dict[str, Any]], device: torch.device, heartbeat: Any = None
) -> TrainModel:
    """A fresh model of the trainer's kind and config, trained on ``samples`` (the validation set) for
    IL_STEPS AdamW steps of mean loss on batches drawn with replacement (trainer/weighting/teacher.py
    ``train_reference``; the global torch RNG is left as it was)."""
    model, _ = train_reference(
        settings, samples, device, seed=1, steps=IL_STEPS, heartbeat=heartbeat or (lambda: None)
    )
    return model
