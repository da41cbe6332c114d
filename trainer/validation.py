"""The trusted validation set and its gradient: what the outer loop lowers the loss on.

The trainer keeps its own copy of the set (saved in every checkpoint's state, so a resumed run has it
even if Redis does not), checks Redis for a new version now and then, and keeps a running average of the
validation-loss gradient over the scored layers:

    G_val <- beta G_val + (1 - beta) grad L_val(theta; a validation batch)       refreshed every
                                                                                 ``val_grad_every`` scorings
    val_loss <- 0.8 val_loss + 0.2 L_val(batch)                                  the progress line's value
                                                                                 (a weighting rule that
                                                                                 does not score: the last
                                                                                 ``full_loss``)

Samples of the set that the model cannot use (they fail to collate) are left out with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from store.feed import TrainerFeed
from trainer.hypergrad import val_grad
from trainer.models.base import TrainModel, to_device
from trainer.quarantine import collate_failures
from trainer.table import WeightTable

log = logging.getLogger("datadiet.trainer")


class Validation:
    def __init__(self) -> None:
        self.version = -1  # the version held (-1: none yet)
        self.samples: list[dict[str, Any]] = []
        # per shard (WeightTable.max_ordinals): the newest sample's ordinal when the set was last checked
        self.checked_ordinal = np.full(1, -1, dtype=np.int64)
        self.g_val: list[torch.Tensor] | None = None  # G_val, one tensor per scored layer
        self.loss = math.nan  # running validation loss
        self.measured = math.nan  # the last ``full_loss``
        self.unusable = 0  # samples of the current set the model cannot use

    def refresh(
        self,
        feed: TrainerFeed,
        table: WeightTable,
        model: TrainModel,
        on_load: Callable[[bool], None],
    ) -> None:
        """Load the set from Redis if it changed (or the trainer lost its copy). ``on_load(new)`` runs
        after a set is taken (``new``: a new version, not the same one reloaded), before
        ``checked_ordinal`` moves on (so it still marks the samples that arrived before the new set).
        Raises Redis errors."""
        version = feed.validation_version()
        if version == self.version and (self.samples or version <= 0):
            self.checked_ordinal = table.max_ordinals()
            return
        version, samples = feed.validation()
        if not samples and self.samples:
            # Redis lost the set (a restart without persistence): the trainer's copy is still the task
            log.warning(
                "the validation set is gone from Redis (version %d); keeping the trainer's copy (v%d, %d "
                "samples) until a new one is sent",
                version,
                self.version,
                len(self.samples),
            )
            self.version = version
            return
        bad = collate_failures(model, samples)
        if bad:
            first = min(bad)
            log.warning(
                "validation set v%d: leaving out %d samples the model cannot use (first: #%d, %s)",
                version,
                len(bad),
                first,
                bad[first],
            )
            samples = [v for i, v in enumerate(samples) if i not in bad]
        self.unusable = len(bad)
        same = version == self.version  # the same set, reloaded (the trainer had lost its copy)
        self.version, self.samples = version, samples
        if not same:
            self.g_val = None
            self.measured = math.nan  # the old set's
        on_load(not same)
        if same:
            return
        self.checked_ordinal = table.max_ordinals()
        log.info("validation set v%d: %d samples", self.version, len(self.samples))

    def batch(self, model: TrainModel, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
        k = min(size, len(self.samples))
        idx = rng.choice(len(self.samples), size=k, replace=False)
        return to_device(model.collate([self.samples[i] for i in idx]), model.device)

    def refresh_gradient(
        self, model: TrainModel, rng: np.random.Generator, size: int, beta: float, autocast: bool
    ) -> None:
        """G_val <- beta G_val + (1 - beta) g on a fresh validation batch of ``size``; the running loss."""
        device = model.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, grads = val_grad(model, self.batch(model, rng, size))
        grads = [g.float() for g in grads]
        if self.g_val is None:
            self.g_val = grads
        else:  # running average: G <- b G + (1 - b) g
            self.g_val = [beta * old + (1 - beta) * new for old, new in zip(self.g_val, grads, strict=True)]
        self.loss = loss if math.isnan(self.loss) else 0.8 * self.loss + 0.2 * loss

    @property
    def current_loss(self) -> float:
        """The validation loss to show: the running one, else (a rule that does not score keeps none)
        the last ``full_loss``; NaN before either (no validation set yet)."""
        return self.loss if not math.isnan(self.loss) else self.measured

    @torch.no_grad()
    def full_loss(self, model: TrainModel, limit: int = 512) -> float:
        """Mean loss over the first ``limit`` samples of the set (NaN without one); model left in eval."""
        if not self.samples:
            return math.nan
        model.eval()
        losses = []
        for i in range(0, min(len(self.samples), limit), 128):
            batch = to_device(model.collate(self.samples[i : i + 128]), model.device)
            losses.append(model.per_sample_loss(batch).float().cpu())
        self.measured = float(torch.cat(losses).mean())
        return self.measured
